"""effopt.host: the one description of what this CPU can do. Its inputs (the CPU's flags, LLVM's name for
it, the override) are given by hand to check each rule; then this machine's own description is checked
against /proc/cpuinfo (the only test that reads it), and EFFOPT_HOST_ISA=avx2 in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

from effopt import host as host_module
from effopt.host import host, make_host, read_cpuinfo, torch_int8_gemm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2 = {"sse4_2", "avx", "avx2", "fma", "bmi2"}
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni"}


def test_a_vm_that_hides_avx512_behind_an_avx512_name_gets_avx2_code():
    h = make_host("AMD EPYC", "AuthenticAMD", AVX2, "x86_64", "znver4")
    assert h.llvm_cpu == "znver3" and h.vector_unit == "avx2" and h.int8_dot == "avx2" and not h.fast_int8
    assert "znver4" in h.notes[0] and "avx512f" in h.notes[0]
    intel = make_host("Xeon", "GenuineIntel", AVX2, "x86_64", "sapphirerapids")
    assert intel.llvm_cpu == "haswell" and intel.level == "AVX2"


def test_the_cpus_own_name_is_kept_where_the_flags_have_what_it_promises():
    h = make_host("AMD EPYC 9R45", "AuthenticAMD", AVX512_VNNI, "x86_64", "znver5")
    assert h.llvm_cpu == "znver5" and not h.notes
    assert h.vector_unit == "avx512" and h.int8_dot == "avx512vnni" and h.fast_int8 and h.level == "AVX-512 VNNI"
    assert h.missing("avx512_vnni") is None


def test_the_avx2_override_drops_every_flag_above_avx2():
    h = make_host("AMD EPYC 9R45", "AuthenticAMD", AVX512_VNNI, "x86_64", "znver5", override="avx2")
    assert not any(f.startswith(("avx512", "avx_vnni")) for f in h.flags)
    assert h.llvm_cpu == "znver3" and h.vector_unit == "avx2" and h.int8_dot == "avx2" and not h.fast_int8
    assert h.missing("avx512_vnni", "avx512bw") == \
        "this CPU has no avx512_vnni, avx512bw (limited by EFFOPT_HOST_ISA=avx2)"


def test_an_llvm_cpu_named_by_hand_sets_the_level_too():
    h = make_host("AMD EPYC 9R45", "AuthenticAMD", AVX512_VNNI, "x86_64", "znver5", cpu_override="znver3")
    assert h.llvm_cpu == "znver3" and h.vector_unit == "avx2" and not h.fast_int8
    with pytest.raises(ValueError, match=r"EFFOPT_HOST_CPU=skylake-avx512 needs avx512bw, avx512f"):
        make_host("AMD EPYC", "AuthenticAMD", AVX2, "x86_64", "znver3", cpu_override="skylake-avx512")


@pytest.mark.parametrize("override, match", [
    ("sse9", r"EFFOPT_HOST_ISA='sse9' is not a level effopt knows; valid: avx2, avx512, avx512vnni, native"),
    ("avx512vnni", r"has no avx512f, avx512bw, avx512_vnni"),
])
def test_bad_overrides_say_what_is_valid(override, match):
    with pytest.raises(ValueError, match=match):
        make_host("AMD EPYC", "AuthenticAMD", AVX2, "x86_64", "znver3", override=override)


def test_arm_hosts_name_their_dot_product():
    h = make_host("Neoverse", "", {"asimd", "asimddp", "i8mm"}, "aarch64", "neoverse-v1", features=None)
    assert h.vector_unit == "neon" and h.int8_dot == "neon-i8mm" and h.fast_int8 and not h.x86


def test_this_machine_is_what_its_cpuinfo_says():
    """The description of the real CPU (no override in this process unless make test-avx2 set one)."""
    _, _, flags = read_cpuinfo()
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this system")
    h = host()
    assert h.flags <= flags
    if h.override is None and not os.environ.get("EFFOPT_HOST_CPU"):
        expected = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else None
        if h.x86:
            assert h.vector_unit == expected
        assert h.fast_int8 == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or not h.x86
    from effopt.target import host_target_dict

    assert host_target_dict()["mcpu"] == h.llvm_cpu


def test_torch_int8_gemm_is_used_only_with_an_int8_dot_product():
    why = torch_int8_gemm()
    if not host().fast_int8:
        assert why is not None and "no int8 dot-product instruction" in why
    else:  # a VNNI CPU: usable unless its sums come out wrong
        assert why is None or "wrong" in why or "fails" in why


SCRIPT = r'''
import json, os
import effopt  # before torch: the override's variables are set before torch's first kernel reads them
import torch
from effopt.host import host
from effopt.ops.int8 import int_mm_usable
from effopt.target import resolve_target
from effopt.lowering.kernels import int8
from effopt.lowering.kernels.common import vector_unit
h = host()
t = resolve_target("host")
print("RESULT " + json.dumps({"override": h.override, "llvm_cpu": h.llvm_cpu, "unit": vector_unit(t).name,
      "isa": int8.isa_of(t).name, "int_mm": int_mm_usable(), "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA"),
      "capability": torch.backends.cpu.get_cpu_capability(), "vnni_runs": int8.host_runs("avx512vnni")}))
'''


def test_the_avx2_override_makes_the_whole_package_an_avx2_machine():
    if host_module.make_host("", "", read_cpuinfo()[2], host().arch, None, features=None).missing("avx2", "fma"):
        pytest.skip("this CPU has no AVX2: the override cannot make it one")
    env = {k: v for k, v in os.environ.items() if k not in (
        "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "EFFOPT_HOST_CPU")}
    env.update(EFFOPT_HOST_ISA="avx2", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert got["override"] == "avx2" and got["unit"] == "avx2" and got["isa"] == "avx2"
    assert got["llvm_cpu"] in ("znver3", "haswell")
    assert got["int_mm"] is not None and "no int8 dot-product" in got["int_mm"]
    assert got["onednn"] == "AVX2" and got["capability"] == "AVX2"  # torch limited by import effopt
    assert "avx512_vnni" in got["vnni_runs"]


def test_without_cpuinfo_the_llvm_name_is_trusted_and_said():
    h = make_host("cpu", "", None, "x86_64", "skylake-avx512")
    assert h.vector_unit == "avx512" and h.llvm_cpu == "skylake-avx512" and "no /proc/cpuinfo" in h.notes[0]
    assert read_cpuinfo("/nonexistent/cpuinfo")[2] is None
