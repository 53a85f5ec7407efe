"""The product as an AVX2-only CPU (Zen 3, Haswell to Comet Lake) gets it, reproduced on any x86 machine
that executes AVX2: effopt.host limited by EFFOPT_HOST_ISA=avx2 and torch by the variables it names, in a
subprocess. Exact, int8 and bf16 compiles there are eager's (or the integer oracle's) result, int8 runs
effopt's AVX2 kernel, no compile fails, and every compile acts on its graph-level check against eager:
where eager won, eager's own kernels run (the very same values), else effopt's."""
import json
import os
import subprocess
import sys

import pytest

from effopt.host import torch_environment
from effopt.lowering.kernels import int8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AVX2_ENV = {"EFFOPT_HOST_ISA": "avx2", **torch_environment("avx2")}

SCRIPT = r'''
import json, warnings
import effopt  # first: EFFOPT_HOST_ISA's torch limits are in the environment before torch's first kernel
import torch
import torch.nn.functional as F
import effopt
from effopt.target import resolve_target
from effopt.lowering.kernels import int8
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from effopt.ops import int8 as int8_ops
from tests.passes.test_quantize import LINEARS, quantized

out = {"capability": torch.backends.cpu.get_cpu_capability(), "isa": int8.isa_of(resolve_target("host")).name}
torch.manual_seed(0)
model, x = vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)


def run(name, m, inp, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = torch.compile(m, backend="effopt", options=dict(options, cache=False))(inp)
            eager = m(inp)
    torch._dynamo.reset()
    rep = effopt.last_report()
    out[name] = {"versus_eager": rep.versus_eager, "runs_eager": rep.runs_eager,
                 "compile_failed": any("compilation failed" in str(w.message) for w in caught),
                 "bitwise_eager": torch.equal(got, eager),
                 "kernels": [[k.ops, k.choice] for k in rep.lowering.kernels]}
    return got


with torch.no_grad():
    exact = model(x)
    oracle = quantized(model, LINEARS if int8_ops.int_mm_usable() is None else LINEARS[:-1])(x)
assert_same_as_eager(run("exact", model, x), exact)
got = run("int8_forced", model, x, quantize="int8-dynamic", kernel_choice="tvm")
torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-4)
got = run("int8", model, x, quantize="int8-dynamic")
out["int8"]["cosine"] = F.cosine_similarity(got.flatten(), exact.flatten(), dim=0).item()
half = vit_tiny_test().eval().to(torch.bfloat16)
xb = x.to(torch.bfloat16)
with torch.no_grad():
    ref = half(xb)
assert_same_as_eager(run("bf16", half, xb, kernel_choice="tvm"), ref)
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def avx2_run():
    why = int8.host_runs("avx2")
    if why:
        pytest.skip(f"{why}: AVX2 code cannot run here")
    env = dict(os.environ, **AVX2_ENV, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_the_subprocess_is_an_avx2_machine(avx2_run):
    assert avx2_run["capability"] == "AVX2" and avx2_run["isa"] == "avx2"


def test_int8_runs_the_avx2_kernel_exactly(avx2_run):
    """(The oracle comparison is in the subprocess: it raised there otherwise.)"""
    kernels = avx2_run["int8_forced"]["kernels"]
    fused = [c for ops, c in kernels if "int8_linear" in ops]
    assert len(fused) == 8 and set(fused) == {"tvm"}, kernels  # 9 linears; the 10-class head: torch GEMM


def test_int8_and_exact_compiles_hold_against_eager(avx2_run):
    """kernel_choice='measure': every int8 layer was timed against its float32 layer, and the whole graph
    against eager; whichever won runs: where eager won, its own kernels (the very same values as the
    model's), else effopt's compiled graph (which differs from eager in the last bits at least)."""
    for name in ("exact", "int8"):
        r = avx2_run[name]
        v = r["versus_eager"]
        assert v is not None and not r["compile_failed"], r
        assert r["runs_eager"] is (not v["use_compiled"]), r
        if r["runs_eager"]:
            assert r["bitwise_eager"], r
    int8_layers = [c for ops, c in avx2_run["int8"]["kernels"] if "int8_linear" in ops]
    assert len(int8_layers) == 8 and set(int8_layers) <= {"tvm", "float32"}, avx2_run["int8"]["kernels"]
    assert avx2_run["int8"]["cosine"] > 0.999


def test_bf16_compiles_region_by_region_on_avx2(avx2_run):
    r = avx2_run["bf16"]
    assert not r["compile_failed"] and not r["runs_eager"] and any(c == "tvm" for _, c in r["kernels"]), r
