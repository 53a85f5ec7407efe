"""Per-kernel choice between a candidate kernel (TVM, or another library) and the eager baseline,
by measurement on the example shapes.

The candidate is first checked against the baseline on random inputs (never silently wrong); then both
are timed interleaved, and the faster is kept, so a compiled graph is never slower than eager kernel by kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.attention import reference_kernels
from ..timing import interleaved_medians

# Per-dtype tolerances for the self-check; fast-math exp/erf stay within a few float32 ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-9), torch.bfloat16: (2e-2, 1e-2),
              torch.float16: (2e-3, 1e-3)}


@dataclass
class Choice:
    use_candidate: bool
    candidate_us: float | None = None
    baseline_us: float | None = None
    reason: str = ""
    # regions with rewritten ops (int8, shift, approximate attention): the float32 layers they replaced,
    # timed beside them, and whether those run instead (faster on this target than either form)
    float_us: float | None = None
    use_float: bool = False

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, d: dict) -> "Choice":
        return cls(bool(d["use_candidate"]), d.get("candidate_us"), d.get("baseline_us"), str(d.get("reason", "")),
                   d.get("float_us"), bool(d.get("use_float", False)))


def concrete(v, gen: torch.Generator):
    """A real value standing in for a fake one: random floats, zero indices (always in range)."""
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.hint is not None else int(v)
    if not isinstance(v, torch.Tensor):
        return v
    shape = [s.node.hint if isinstance(s, torch.SymInt) else s for s in v.shape]
    if v.dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(v.dtype)
    if v.dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    return torch.zeros(shape, dtype=v.dtype)


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def mismatch(ref, got, tolerances=None) -> str | None:
    """Why `got` differs from the eager reference, or None."""
    ref, got = _as_list(ref), _as_list(got)
    if len(ref) != len(got):
        return f"{len(got)} outputs, eager has {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape or r.dtype != g.dtype:
            return f"output {i}: {tuple(g.shape)} {g.dtype}, eager {tuple(r.shape)} {r.dtype}"
        if tolerances is not None and "relative_l2" in tolerances and r.dtype.is_floating_point:
            err = ((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
            if not err <= tolerances["relative_l2"]:
                return f"output {i}: relative L2 error {err:.3g}"
            continue
        rtol, atol = (tolerances or TOLERANCES).get(r.dtype, (0, 0))
        if r.dtype.is_floating_point:
            ok = torch.allclose(g.float(), r.float(), rtol=rtol, atol=atol * max(1.0, r.float().abs().nan_to_num().max().item()),
                                equal_nan=True)
        elif tolerances is not None and "int8_off_by_one" in tolerances and r.dtype in (torch.int8, torch.uint8):
            off = (g.to(torch.int32) - r.to(torch.int32)).abs()
            ok = r.numel() == 0 or (int(off.max()) <= 1 and (off > 0).double().mean().item() <= tolerances["int8_off_by_one"])
        else:
            ok = torch.equal(r, g)
        if not ok:
            err = (g.float() - r.float()).abs().nan_to_num(1e30).max().item()
            return f"output {i}: max abs error {err:.3g}"
    return None


def measure(kernel, eager, args, rounds: int = 7, reps: int = 5, budget_s: float = 0.25) -> tuple[float, float]:
    """Median microseconds of (kernel, eager), interleaved round by round, within about `budget_s`."""
    m = interleaved_medians({"kernel": kernel, "eager": eager}, args, rounds=rounds, reps=reps, budget_s=budget_s)
    return m["kernel"] * 1e6, m["eager"] * 1e6


def versus_float(chosen, float_layers, args, choice: Choice) -> Choice:
    """`choice` with the float32 layers timed against the form it chose; they run instead where faster."""
    with torch.no_grad():
        try:
            float_layers(*args)
        except Exception as e:  # noqa: BLE001 - the rewritten form stays
            choice.reason += f"; float32 layers failed ({type(e).__name__})"
            return choice
        m = interleaved_medians({"chosen": chosen, "float": float_layers}, args, rounds=7, reps=5, budget_s=0.25)
    choice.float_us = m["float"] * 1e6
    if m["float"] < m["chosen"]:
        choice.use_float = True
        choice.reason = (f"the float32 layer measured faster ({choice.float_us:.0f} us) than the rewritten one "
                         f"({m['chosen'] * 1e6:.0f} us, {'TVM kernel' if choice.use_candidate else 'eager op'})")
    return choice


def choose(candidate, baseline, args, force: bool, tolerances=None) -> Choice:
    with torch.no_grad():
        with reference_kernels():  # effopt's own ops as their PyTorch references, not their eager kernels
            ref = baseline(*args)
        try:
            got = candidate(*args)
        except Exception as e:  # noqa: BLE001 - e.g. oneDNN has no bf16 inner product on an AVX2-only CPU
            return Choice(False, reason=f"candidate failed on this CPU ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200]})")
        why = mismatch(ref, got, tolerances)
        if why:
            return Choice(False, reason=f"result differs from eager ({why})")
        cand_us, base_us = measure(candidate, baseline, args)
    if force:
        return Choice(True, cand_us, base_us, "kernel_choice='tvm'")
    faster = cand_us < base_us
    return Choice(faster, cand_us, base_us, "measured faster" if faster else "eager measured faster")
