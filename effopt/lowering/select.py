"""Lowering step 5, choose: per region, the form that runs (its TVM kernel, its eager ops, or the float32
layers its rewritten ops replaced), by measurement on the example shapes; every decision returned as data
(`Pick`), which step 6 (replace.py) only applies.

The candidate is first checked against the baseline on random inputs (never silently wrong); then both
are timed interleaved, and the faster is kept, so a compiled graph is never slower than eager kernel by kernel.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ops.attention import reference_kernels
from ..ops.spec import spec_of
from ..timing import interleaved_medians

# Per-dtype tolerances for the self-check; fast-math exp/erf stay within a few float32 ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-9), torch.bfloat16: (2e-2, 1e-2),
              torch.float16: (2e-3, 1e-3)}


@dataclass
class Pick:
    """What runs in a region's place (`choice.form`): its compiled `kernel`, the float32 layers its rewritten ops
    replaced (`graph`'s FloatRegion), or its torch ops, inline."""
    graph: fx.Graph
    choice: "Choice"
    kernel: torch.nn.Module | None = None
    key: str | None = None  # the region's kernel key (its per-bucket choices are stored under it)

    def times_us(self) -> dict[str, float | None]:
        """Each form this region can run and its compile-time time (None where not timed): the TVM kernel where
        it passed its check, its torch ops, and the float32 layers its rewritten ops replaced."""
        c, out = self.choice, {}
        if self.kernel is not None and c.candidate_us is not None:
            out["tvm"] = c.candidate_us
        out["eager"] = c.baseline_us
        if c.float_us is not None:
            out["float32"] = c.float_us
        return out


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

    @property
    def form(self) -> str:
        """What runs: "float32" (the layers the rewritten ops replaced), "tvm" (the candidate) or "eager"."""
        return "float32" if self.use_float else "tvm" if self.use_candidate else "eager"

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


def check_and_time(candidate, baseline, args, force: bool, tolerances=None) -> Choice:
    """The candidate checked against the baseline on `args`, then both timed: the faster kept (or the candidate,
    with `force`)."""
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


class FloatRegion(torch.nn.Module):
    """A region whose rewritten ops (int8, shift, approximate attention) run as the float32 layers they
    replaced (each node's meta["float_form"], a module taking the op's own arguments)."""

    def __init__(self, region_graph: fx.Graph):
        super().__init__()
        graph = fx.Graph()
        graph.output(graph.graph_copy(region_graph, {}))  # node meta (the float forms) comes along
        self.layers = torch.nn.ModuleList()
        for n in graph.nodes:
            if n.op == "call_function" and isinstance(n.meta.get("float_form"), torch.nn.Module):
                self.layers.append(n.meta["float_form"])
                n.op, n.target = "call_module", f"layers.{len(self.layers) - 1}"
        self.gm = fx.GraphModule(self, graph)

    def forward(self, *args):
        return self.gm(*args)


def has_float_forms(graph: fx.Graph) -> list[str]:
    return [n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            for n in graph.nodes if n.op == "call_function" and isinstance(n.meta.get("float_form"), torch.nn.Module)]


def region_tolerances(graph: fx.Graph):
    """The self-check's tolerances for a region: float rounding, unless one of its ops declares its own
    (effopt/ops/: L-Mul's relative L2 error, int8's off-by-one codes); the loosest wins."""
    declared = [s.tolerance for s in (spec_of(n.target) for n in graph.nodes if n.op == "call_function")
                if s is not None and s.tolerance]
    if not declared:
        return None
    relative = [t["relative_l2"] for t in declared if "relative_l2" in t]
    if relative:
        return {"relative_l2": max(relative)}
    out = dict(TOLERANCES)
    for t in declared:
        for k, v in t.items():
            out[k] = max(out.get(k, v), v)
    return out


def region_args(gm: fx.GraphModule, region, gen: torch.Generator) -> list:
    """Inputs to check and time a region on: the graph's own constants, random stand-ins for the rest."""
    return [getattr(gm, a.target) if a.op == "get_attr" else concrete(a.meta.get("val"), gen) for a in region.inputs]


# ---- lowering step 5, choose: per region, its kernel against eager (and against the float32 layers it replaced) --
def choose_kernels(gm: fx.GraphModule, regions, conv, built, record, force: bool, gen: torch.Generator) -> dict:
    """{region index: Pick} for the regions with a built kernel; each kernel checked against the region's eager
    form and timed beside it (choices already in the kernel cache are reused), and a KernelRecord per region.
    `conv.unconverted` gains the regions whose kernel did not build."""
    from .records import EffoptFallbackWarning, KernelRecord, region_ops
    from .runtime import TVMKernel

    picks = {}
    for i, region in enumerate(regions):
        if i not in conv.region_fn or conv.region_fn[i] not in conv.funcs:
            if i in conv.region_fn and has_float_forms(conv.converted[i][0]):  # its kernel did not build
                conv.unconverted[i] = conv.converted[i][0]
            continue
        fkey = conv.region_fn[i]
        kname = conv.funcs[fkey][0]
        graph, r = conv.converted[i]
        kernel = TVMKernel(built.vm[kname], r.tensor_inputs, len(region.outputs) == 1, kname, r.sym_sources,
                           r.out_layouts, r.out_strides)
        if fkey not in built.choices:
            args = region_args(gm, region, gen)
            eager = fx.GraphModule(torch.nn.Module(), graph)  # the region as torch ops: the baseline
            c = check_and_time(kernel, eager, args, force, region_tolerances(graph))
            if not c.use_candidate and c.reason.startswith("result differs"):
                warnings.warn(f"effopt: kernel {kname} ({', '.join(region_ops(graph))}) was not used: {c.reason}",
                              EffoptFallbackWarning, stacklevel=3)
            if not force and has_float_forms(graph):  # rewritten ops: against the float32 layers too
                c = versus_float(kernel if c.use_candidate else eager, FloatRegion(graph), args, c)
            built.choices[fkey] = c
        c = built.choices[fkey]
        record.kernels.append(KernelRecord(f"tvm_region{i}", region_ops(graph), c.form, c.candidate_us,
                                           c.baseline_us, c.reason, conv.scripts[fkey], kname, float_us=c.float_us))
        picks[i] = Pick(graph, c, kernel, key=fkey)
    return picks


def choose_float_instead(gm, regions, graphs: dict, record, force: bool, gen) -> dict:
    """{region index: Pick} for the regions with rewritten ops that run eager (no TVM kernel for them on this
    target): their eager form timed against the float32 layers they replaced, which run instead where faster
    (an int8 GEMM without a fast int8 dot product, torch._int_mm's reference loop on AVX2, is 20-50x slower
    than float32)."""
    from .records import KernelRecord, region_ops

    picks = {}
    for i, graph in ({} if force else graphs).items():
        eager = fx.GraphModule(torch.nn.Module(), graph)
        c = versus_float(eager, FloatRegion(graph), region_args(gm, regions[i], gen),
                         Choice(False, reason="no TVM kernel"))
        record.kernels.append(KernelRecord(f"eager_region{i}", region_ops(graph), c.form, None, None, c.reason,
                                           float_us=c.float_us))
        picks[i] = Pick(graph, c)
    return picks


def choose(gm: fx.GraphModule, regions, conv, built, record, force: bool, gen: torch.Generator) -> dict:
    """Every region's Pick: the built kernels against eager (and against the float32 layers they replaced), then
    the regions of rewritten ops without a kernel against their float32 layers; one warning for every region of
    rewritten ops that stays float32."""
    from .records import EffoptSlowerWarning

    picks = choose_kernels(gm, regions, conv, built, record, force, gen) if built is not None else {}
    picks.update(choose_float_instead(gm, regions, conv.unconverted, record, force, gen))
    kept = [k for k in record.kernels if k.choice == "float32"]
    if kept:
        rewritten = [k for k in record.kernels if k.float_us is not None]
        ops = sorted({o for k in kept for o in k.ops})
        warnings.warn(f"effopt: on this CPU, {len(kept)} of {len(rewritten)} rewritten layer(s) ({', '.join(ops)}) "
                      "measured slower than the float32 layers they replace, which run instead (the report's "
                      "lowering lists them)", EffoptSlowerWarning, stacklevel=3)
    return picks
