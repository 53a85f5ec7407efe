"""What machine a benchmark measured: the CPU, the ISA effopt generates kernels for, torch's ISA, and
whether a lower ISA was emulated (EFFOPT_HOST_CPU, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
from __future__ import annotations

import os
import platform

# the /proc/cpuinfo flags of each ISA level a table names, best first
LEVELS = [("AMX", ("amx_tile", "amx_int8")), ("AVX-512 VNNI", ("avx512_vnni",)), ("AVX-VNNI", ("avx_vnni",)),
          ("AVX2", ("avx2", "fma")), ("NEON dotprod", ("asimddp",))]
ISA_NAMES = {"avx512vnni": "AVX-512 VNNI", "avxvnni": "AVX-VNNI", "avx2": "AVX2", "neon-dot": "NEON dotprod",
             "neon-i8mm": "NEON i8mm"}


def _cpuinfo() -> tuple[str, set]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cpu_isa() -> str:
    """The best ISA level the CPU itself has (read from /proc/cpuinfo)."""
    _, flags = _cpuinfo()
    return next((name for name, need in LEVELS if all(f in flags for f in need)), platform.machine())


def describe() -> dict:
    """{"cpu", "cores", "cpu_isa", "isa" (what effopt's kernels and torch run here), "emulated", "line"}."""
    import torch

    from effopt.target import resolve_target, target_dict
    from effopt.lowering.kernels import int8

    name, _ = _cpuinfo()
    host = target_dict("host")
    found = int8.isa_of(resolve_target(host))
    effopt_isa = ISA_NAMES.get(found.name, found.name) if found is not None else "no int8 dot product"
    real = cpu_isa()
    emulated = any(os.environ.get(v) for v in ("EFFOPT_HOST_CPU", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
    isa = f"{effopt_isa} (emulated on an {real} CPU)" if emulated else real
    line = (f"machine: {name} ({host.get('mcpu')}), {os.cpu_count()} cores; ISA {isa}; torch "
            f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    return {"cpu": name, "cores": os.cpu_count(), "cpu_isa": real, "isa": isa, "emulated": emulated,
            "llvm_cpu": host.get("mcpu"), "torch_isa": torch.backends.cpu.get_cpu_capability(), "line": line}
