"""Differential fuzzing of the backend against eager PyTorch (as NNSmith does for TVM).

A program is a short random list of ops over a pool of tensors (elementwise, reductions, softmax, norms,
matmuls, convolutions, reshapes/permutes/slices/concat, written-out attention), with random shapes that
include size-1 and odd sizes, and inputs and ops chosen to keep values finite. Each program runs eagerly
in float32, through `backend="effopt"` (exact passes only), and in float64; the compiled result must be as
close to the float64 result as eager's is, up to a small multiple (the check torch's dynamo accuracy
minifier makes), or the program fails.

Programs are plain data (JSON): a failure is written as a standalone repro script, minimized to the
shortest failing prefix. Several programs compile as one model (independent outputs), so a batch costs
one compile.

    python -m effopt.testing.fuzz --seconds 600 --out fuzz-failures     # `make fuzz`
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
import warnings

import torch
import torch.nn.functional as F

SIZES = (1, 2, 3, 5, 7, 8, 16, 17)
MAX_NUMEL = 1 << 18  # elements per tensor (1 MB in float32)
UNARY = ("relu", "gelu", "tanh", "sigmoid", "silu", "abs", "neg", "exp", "log1p_abs", "sqrt_abs", "square",
         "clamp", "hardswish")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")


# ---- programs ----------------------------------------------------------------------------------------
def generate(seed: int, max_ops: int = 10) -> dict:
    """A random program: {"inputs": [shapes], "ops": [[op, [input indices], {params}]], "seed"}."""
    rng = random.Random(seed)
    rank = rng.choice((2, 3, 3, 4))
    shapes = [[rng.choice(SIZES) for _ in range(rank)]]
    if rng.random() < 0.5:  # a second input, broadcast-compatible with the first
        shapes.append([d if rng.random() < 0.7 else 1 for d in shapes[0]])
    pool = [list(s) for s in shapes]
    ops = []
    for _ in range(rng.randint(1, max_ops)):
        step = _random_op(rng, pool)
        if step is None:
            continue
        op, args, params, shape = step
        inner = pool[args[0]][:-1] + [pool[args[0]][-2]] if op in ("matmul_t", "attention") else shape
        if math.prod(shape) > MAX_NUMEL or math.prod(inner) > MAX_NUMEL:
            continue  # concat and matmuls can grow a program past memory: keep every tensor small
        ops.append([op, args, params])
        pool.append(shape)
    return {"seed": seed, "inputs": shapes, "ops": ops}


def _random_op(rng: random.Random, pool: list[list[int]]):
    i = rng.randrange(len(pool))
    s = pool[i]
    r = len(s)
    kind = rng.choice(("unary", "unary", "binary", "binary", "reduce", "softmax", "norm", "linear", "matmul",
                       "shape", "shape", "conv", "pool", "attention", "cat"))
    if kind == "unary":
        return rng.choice(UNARY), [i], {}, s
    if kind == "binary":
        same = [j for j, t in enumerate(pool) if _broadcast(s, t) is not None]
        j = rng.choice(same)
        return rng.choice(BINARY), [i, j], {}, _broadcast(s, pool[j])
    if kind == "reduce":
        d, keep = rng.randrange(r), rng.random() < 0.5
        if r == 1 and not keep:
            return None
        out = list(s) if keep else s[:d] + s[d + 1:]
        if keep:
            out[d] = 1
        return rng.choice(("sum", "mean", "amax", "var")), [i], {"dim": d, "keepdim": keep}, out
    if kind == "softmax":
        return rng.choice(("softmax", "log_softmax")), [i], {"dim": rng.randrange(r)}, s
    if kind == "norm":
        return "layer_norm", [i], {"n": s[-1]}, s
    if kind == "linear":
        n = rng.choice(SIZES)
        return "linear", [i], {"k": s[-1], "n": n, "bias": rng.random() < 0.7}, s[:-1] + [n]
    if kind == "matmul" and r >= 2:
        return "matmul_t", [i], {}, s[:-1] + [s[-2]]  # x @ x^T over the last two dims
    if kind == "shape":
        choice = rng.choice(("permute", "transpose", "flatten", "slice", "unsqueeze_squeeze", "reshape", "flip",
                             "pad"))
        if choice == "flip":
            return "flip", [i], {"dims": sorted(rng.sample(range(r), rng.randint(1, r)))}, s
        if choice == "pad":
            left, right = rng.randint(0, 2), rng.randint(0, 2)
            return "pad", [i], {"pad": [left, right]}, s[:-1] + [s[-1] + left + right]
        if choice == "permute":
            perm = list(range(r))
            rng.shuffle(perm)
            return "permute", [i], {"perm": perm}, [s[p] for p in perm]
        if choice == "transpose" and r >= 2:
            a, b = rng.sample(range(r), 2)
            out = list(s)
            out[a], out[b] = out[b], out[a]
            return "transpose", [i], {"a": a, "b": b}, out
        if choice == "flatten" and r >= 3:
            return "flatten", [i], {}, s[:-2] + [s[-2] * s[-1]]
        if choice == "slice":
            d = rng.randrange(r)
            step = rng.choice((1, 2))
            start = rng.randrange(s[d])
            out = list(s)
            out[d] = len(range(start, s[d], step))
            return "slice", [i], {"dim": d, "start": start, "step": step}, out
        if choice == "reshape" and r >= 2:
            return "reshape", [i], {"shape": [s[0], -1]}, [s[0], math.prod(s[1:])]
        return "unsqueeze_squeeze", [i], {"dim": rng.randrange(r + 1)}, s
    if kind == "conv" and r == 4 and s[2] >= 3 and s[3] >= 3:
        k, stride, pad = rng.choice((1, 3)), rng.choice((1, 2)), rng.choice((0, 1))
        n = rng.choice((2, 4, 8))
        ho, wo = (s[2] + 2 * pad - k) // stride + 1, (s[3] + 2 * pad - k) // stride + 1
        if ho < 1 or wo < 1:
            return None
        return "conv2d", [i], {"c": s[1], "n": n, "k": k, "stride": stride, "pad": pad}, [s[0], n, ho, wo]
    if kind == "pool" and r == 4 and s[2] >= 3 and s[3] >= 3:
        k, stride = rng.choice((2, 3)), rng.choice((1, 2))
        pad = rng.randint(0, k // 2)
        ho, wo = (s[2] + 2 * pad - k) // stride + 1, (s[3] + 2 * pad - k) // stride + 1
        return rng.choice(("max_pool", "avg_pool")), [i], {"k": k, "stride": stride, "pad": pad}, [s[0], s[1], ho, wo]
    if kind == "attention" and r == 3:
        return "attention", [i], {"c": s[-1], "masked": rng.random() < 0.4}, s
    if kind == "cat":
        d = rng.randrange(r)
        out = list(s)
        out[d] *= 2
        return "cat_self", [i], {"dim": d}, out
    return rng.choice(UNARY), [i], {}, s


def _broadcast(a: list[int], b: list[int]) -> list[int] | None:
    if len(a) != len(b):
        return None
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return out


class Program(torch.nn.Module):
    """A program as a module: its parameters are created from the program's seed."""

    def __init__(self, program: dict):
        super().__init__()
        self.program = program
        g = torch.Generator().manual_seed(program["seed"])
        self.params = torch.nn.ParameterDict()
        for k, (op, _, p) in enumerate(program["ops"]):
            if op == "linear":
                self.params[f"w{k}"] = torch.nn.Parameter(torch.randn(p["n"], p["k"], generator=g) / math.sqrt(p["k"]))
                if p["bias"]:
                    self.params[f"b{k}"] = torch.nn.Parameter(torch.randn(p["n"], generator=g) * 0.1)
            elif op == "layer_norm":
                self.params[f"w{k}"] = torch.nn.Parameter(1 + 0.1 * torch.randn(p["n"], generator=g))
                self.params[f"b{k}"] = torch.nn.Parameter(0.1 * torch.randn(p["n"], generator=g))
            elif op == "conv2d":
                fan = p["c"] * p["k"] * p["k"]
                self.params[f"w{k}"] = torch.nn.Parameter(
                    torch.randn(p["n"], p["c"], p["k"], p["k"], generator=g) / math.sqrt(fan))
            elif op == "attention":
                self.params[f"w{k}"] = torch.nn.Parameter(torch.randn(3 * p["c"], p["c"], generator=g) / math.sqrt(p["c"]))

    def inputs(self, dtype=torch.float32) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.program["seed"] + 1)
        return [torch.randn(s, generator=g).to(dtype) for s in self.program["inputs"]]

    def forward(self, *xs):
        vals = list(xs)
        used = set()
        for k, (op, args, p) in enumerate(self.program["ops"]):
            vals.append(_apply(op, [vals[a] for a in args], p, self.params, k))
            used.update(args)
        outs = [v for j, v in enumerate(vals) if j >= len(xs) and j not in used]
        return tuple(outs) if outs else (vals[-1],)


def _apply(op: str, a: list[torch.Tensor], p: dict, params, k: int) -> torch.Tensor:
    x = a[0]
    unary = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
             "abs": torch.abs, "neg": torch.neg, "exp": lambda t: torch.exp(t.clamp(-8, 8)),
             "log1p_abs": lambda t: torch.log1p(t.abs()), "sqrt_abs": lambda t: torch.sqrt(t.abs() + 1e-3),
             "square": lambda t: t * t, "clamp": lambda t: t.clamp(-0.5, 0.7), "hardswish": F.hardswish}
    if op in unary:
        return unary[op](x)
    if op in BINARY:
        y = a[1]
        return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
                "minimum": torch.minimum, "div": lambda u, v: u / (v.abs() + 0.5)}[op](x, y)
    if op in ("sum", "mean", "amax"):
        return getattr(torch, op)(x, dim=p["dim"], keepdim=p["keepdim"])
    if op == "var":
        return torch.var(x, dim=p["dim"], keepdim=p["keepdim"], unbiased=False)
    if op == "softmax":
        return torch.softmax(x, dim=p["dim"])
    if op == "log_softmax":
        return torch.log_softmax(x, dim=p["dim"])
    if op == "layer_norm":
        return F.layer_norm(x, (p["n"],), params[f"w{k}"], params[f"b{k}"])
    if op == "linear":
        return F.linear(x, params[f"w{k}"], params[f"b{k}"] if p["bias"] else None)
    if op == "matmul_t":
        return x @ x.transpose(-1, -2)
    if op == "permute":
        return x.permute(*p["perm"])
    if op == "transpose":
        return x.transpose(p["a"], p["b"])
    if op == "flatten":
        return x.flatten(-2)
    if op == "slice":
        idx = [slice(None)] * x.dim()
        idx[p["dim"]] = slice(p["start"], None, p["step"])
        return x[tuple(idx)]
    if op == "reshape":
        return x.reshape(*p["shape"])
    if op == "unsqueeze_squeeze":
        return x.unsqueeze(p["dim"]).squeeze(p["dim"])
    if op == "flip":
        return torch.flip(x, p["dims"])
    if op == "pad":
        return F.pad(x, p["pad"], value=0.25)
    if op in ("max_pool", "avg_pool"):
        pool = F.max_pool2d if op == "max_pool" else F.avg_pool2d
        return pool(x, p["k"], p["stride"], p["pad"])
    if op == "conv2d":
        return F.conv2d(x, params[f"w{k}"], stride=p["stride"], padding=p["pad"])
    if op == "attention":  # written out op by op, so the fusion pass sees it
        b, t, c = x.shape
        q, kk, v = F.linear(x, params[f"w{k}"]).chunk(3, dim=-1)
        s = (q @ kk.transpose(-1, -2)) * c ** -0.5
        if p["masked"]:
            s = s + torch.triu(torch.full((t, t), -1e9, dtype=x.dtype), diagonal=1)
        return s.softmax(dim=-1) @ v
    if op == "cat_self":
        return torch.cat([x, x * 0.5], dim=p["dim"])
    raise ValueError(f"unknown fuzz op {op!r}")


# ---- running ---------------------------------------------------------------------------------------------
class Batch(torch.nn.Module):
    """Several programs as one model: one compile for all, one output group each."""

    def __init__(self, programs: list[dict]):
        super().__init__()
        self.progs = torch.nn.ModuleList([Program(p) for p in programs])

    def forward(self, *xs):
        outs, at = [], 0
        for p in self.progs:
            n = len(p.program["inputs"])
            outs.append(p(*xs[at:at + n]))
            at += n
        return tuple(outs)

    def inputs(self, dtype=torch.float32):
        return [t for p in self.progs for t in p.inputs(dtype)]


def compare(got, eager, ref64, multiplier: float = 10.0) -> str | None:
    """Why the compiled outputs are wrong, or None: shape and dtype first, then the compiled error to the
    float64 reference must not exceed `multiplier` x eager's error plus a float32 rounding floor."""
    if len(got) != len(eager):
        return f"{len(got)} outputs, eager has {len(eager)}"
    for i, (g, e, r) in enumerate(zip(got, eager, ref64)):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"output {i}: {tuple(g.shape)} {g.dtype}, eager {tuple(e.shape)} {e.dtype}"
        if not torch.isfinite(e).all():
            continue  # eager itself is not finite: nothing to hold the compiled result to
        if not torch.isfinite(g).all():
            return f"output {i}: non-finite values where eager's are finite"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err_e = (e.double() - r).abs().max().item() if r.numel() else 0.0
        err_g = (g.double() - r).abs().max().item() if r.numel() else 0.0
        if err_g > multiplier * err_e + 1e-5 * scale:
            return f"output {i}: error to float64 {err_g:.3g}, eager's {err_e:.3g}"
    return None


def run_batch(programs: list[dict], **options) -> dict[int, str]:
    """{index in programs: why it failed} for one compile of all of them (exact passes only)."""
    model = Batch(programs).eval()
    xs = model.inputs()
    with torch.no_grad():
        eager = model(*xs)
        ref = Batch(programs).double().eval()
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        ref64 = ref(*[x.double() for x in xs])
        torch._dynamo.reset()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = torch.compile(model, backend="effopt", options=dict(options))(*xs)
        except Exception as e:  # noqa: BLE001 - a crash is a failure of every program in the batch
            return {i: f"crash: {type(e).__name__}: {str(e)[:300]}" for i in range(len(programs))}
    failures = {}
    for i, (g, e, r) in enumerate(zip(got, eager, ref64)):
        why = compare(list(g), list(e), list(r))
        if why:
            failures[i] = why
    # a TVM kernel that the lowering's self-check rejected (it differed from eager) or that did not build is
    # not a wrong result, but it is a lowering bug: find the program(s) that produce it
    rejected = [str(w.message) for w in caught if any(k in str(w.message) for k in (
        "result differs from eager", "could not compile kernel", "compilation failed"))]
    if rejected and len(programs) == 1:
        failures.setdefault(0, f"lowering bug caught by a fallback: {rejected[0][:300]}")
    elif rejected:
        for i, p in enumerate(programs):
            if i not in failures:
                alone = run_batch([p], **options).get(0)
                if alone:
                    failures[i] = alone
    return failures


def minimize(program: dict, **options) -> tuple[dict, str]:
    """The shortest prefix of the program that still fails (its last op's result as the output)."""
    why = run_batch([program], **options).get(0)
    best = (program, why)
    lo, hi = 1, len(program["ops"])
    while lo < hi:  # failures are usually monotone in the prefix: bisect, then confirm
        mid = (lo + hi) // 2
        cand = dict(program, ops=program["ops"][:mid])
        w = run_batch([cand], **options).get(0)
        if w:
            best, hi = (cand, w), mid
        else:
            lo = mid + 1
    return best


def repro_script(program: dict, why: str, options: dict) -> str:
    return f'''"""effopt fuzz failure (seed {program["seed"]}): {why}

Run: python {{this file}} (needs effopt installed)."""
import torch
from effopt.testing.fuzz import Batch, compare

PROGRAM = {json.dumps(program)}
OPTIONS = {json.dumps(options)}

model = Batch([PROGRAM]).eval()
xs = model.inputs()
with torch.no_grad():
    eager = model(*xs)[0]
    ref = Batch([PROGRAM]).double().eval()
    ref.load_state_dict({{k: v.double() for k, v in model.state_dict().items()}})
    ref64 = ref(*[x.double() for x in xs])[0]
    got = torch.compile(model, backend="effopt", options=OPTIONS)(*xs)[0]
print(compare(list(got), list(eager), list(ref64)) or "passes now")
'''


def fuzz(seeds, batch: int = 10, out_dir: str | None = None, deadline: float | None = None, log=print,
         **options) -> dict:
    """Run programs of `seeds` in batches; returns {"graphs", "failures": [(seed, why)], "seconds"}."""
    t0, done, failures = time.perf_counter(), 0, []
    seeds = list(seeds)
    for at in range(0, len(seeds), batch):
        if deadline is not None and time.perf_counter() > deadline:
            break
        programs = [generate(s) for s in seeds[at:at + batch]]
        for i, why in run_batch(programs, **options).items():
            prog, why = minimize(programs[i], **options)
            if why is None:  # passes alone: a batch interaction; keep the whole program
                prog, why = programs[i], run_batch([programs[i]], **options).get(0) or "fails only in a batch"
            failures.append((programs[i]["seed"], why))
            log(f"  seed {programs[i]['seed']}: {why}")
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, f"repro_{programs[i]['seed']}.py"), "w") as f:
                    f.write(repro_script(prog, why, options))
        done += len(programs)
    return {"graphs": done, "failures": failures, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--start", type=int, default=100000, help="first seed")
    ap.add_argument("--count", type=int, default=10 ** 6, help="at most this many programs")
    ap.add_argument("--out", default="fuzz-failures")
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.seconds
    result = fuzz(range(args.start, args.start + args.count), out_dir=args.out, deadline=deadline)
    print(f"fuzzed {result['graphs']} graphs in {result['seconds']:.0f} s: {len(result['failures'])} failure(s)"
          + (f", repro scripts in {args.out}/" if result["failures"] else ""))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["generate", "Program", "Batch", "compare", "run_batch", "minimize", "fuzz", "repro_script"]
