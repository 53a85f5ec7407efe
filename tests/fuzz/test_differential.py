"""Differential fuzzing (effopt/testing/fuzz.py): seeded random graphs through the backend against eager,
under a float64 oracle; and the fuzzer's own machinery (the oracle's verdicts, minimization, repro scripts)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from effopt.testing import fuzz
from tests.conftest import FIGURES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAPHS = int(os.environ.get("EFFOPT_FUZZ_GRAPHS", "300"))


def test_seeded_random_graphs_agree_with_eager():
    result = fuzz.fuzz(range(GRAPHS), batch=10)
    assert result["graphs"] == GRAPHS
    FIGURES["graphs fuzzed"] = (f"{result['graphs']} seeded graphs against eager under a float64 oracle, "
                                f"{len(result['failures'])} failure(s), {result['seconds']:.0f} s")
    assert not result["failures"], result["failures"]


def test_generated_programs_cover_the_operators_and_odd_shapes():
    progs = [fuzz.generate(s) for s in range(GRAPHS)]
    ops = {op for p in progs for op, _, _ in p["ops"]}
    for needed in ("linear", "matmul_t", "softmax", "layer_norm", "conv2d", "attention", "permute", "slice",
                   "cat_self", "sum", "add", "gelu", "max_pool", "avg_pool", "pad", "flip", "hardswish"):
        assert needed in ops, needed
    dims = {d for p in progs for s in p["inputs"] for d in s}
    assert {1, 3, 17} <= dims
    assert all(len(p["ops"]) <= 10 for p in progs)
    assert json.loads(json.dumps(progs[0])) == progs[0]  # plain data: a repro is a JSON literal


def test_the_oracle_fails_wrong_results_and_passes_rounding():
    torch.manual_seed(0)
    ref = torch.randn(4, 8, dtype=torch.float64)
    eager = ref.float()
    assert fuzz.compare([eager + 1e-7], [eager], [ref]) is None  # float32 rounding
    assert "error to float64" in fuzz.compare([eager * 1.01], [eager], [ref])
    assert "shape" not in (fuzz.compare([eager.t()], [eager], [ref]) or "") and \
        fuzz.compare([eager.t()], [eager], [ref]).startswith("output 0: (8, 4)")
    assert "non-finite" in fuzz.compare([eager / 0], [eager], [ref])
    assert fuzz.compare([eager.double()], [eager], [ref]).endswith("torch.float32")


def test_a_failure_is_minimized_to_its_shortest_prefix_and_written_as_a_repro(monkeypatch, tmp_path):
    prog = {"seed": 7, "inputs": [[2, 3]], "ops": [["relu", [0], {}], ["tanh", [1], {}], ["exp", [2], {}],
                                                   ["neg", [3], {}], ["abs", [4], {}]]}
    # a backend that gets `exp` wrong: every program with one fails
    monkeypatch.setattr(fuzz, "run_batch", lambda programs, **o: {
        i: "output 0: wrong" for i, p in enumerate(programs) if any(op == "exp" for op, _, _ in p["ops"])})
    small, why = fuzz.minimize(prog)
    assert [op for op, _, _ in small["ops"]] == ["relu", "tanh", "exp"] and why == "output 0: wrong"
    monkeypatch.setattr(fuzz, "generate", lambda seed: prog if seed == 7 else dict(prog, seed=seed, ops=prog["ops"][:2]))
    result = fuzz.fuzz([5, 6, 7], batch=2, out_dir=str(tmp_path), log=lambda *a: None)
    assert result["graphs"] == 3 and [s for s, _ in result["failures"]] == [7]
    script = (tmp_path / "repro_7.py").read_text()
    assert '"exp"' in script and '"neg"' not in script  # the minimized program
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, str(tmp_path / "repro_7.py")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0 and "passes now" in proc.stdout, proc.stderr[-2000:]  # the real backend is right


@pytest.mark.parametrize("seed", [3, 11])
def test_a_program_runs_the_same_in_float64(seed):
    prog = fuzz.generate(seed)
    m = fuzz.Program(prog).eval()
    out32 = m(*m.inputs())
    m64 = fuzz.Program(prog).double().eval()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    out64 = m64(*m.inputs(torch.float64))
    assert len(out32) == len(out64)
    for a, b in zip(out32, out64):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
