"""The torch.compile backend: capture -> passes -> lowering -> runtime."""
from __future__ import annotations

import functools
import json
import warnings

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import capture
from .graph import publish
from .lowering import EffoptFallbackWarning, EffoptSlowerWarning, size_bucket
from .lowering.buckets import close_call
from .passes.guard import DEFAULT_BUDGET, Calibrated, CalibrationSet, GuardResult
from .options import KernelChoice, Options
from .passes import default_pass_manager
from .logs import log_lowering, log_record
from .inspect.report import Report, set_last_report

_warned_training = False
# The compiled graph runs only if its median is within this factor of eager's on the example inputs: 2-core
# timing noise between interleaved medians stays under 5% (benchmarks/backend.py's repeated runs).
NOISE = 1.05
# held-out validation over budget: the approximate passes run again at most this many times, each with the
# guards' budget scaled down, the last time with none (no approximate rewrite)
MAX_BACKOFFS = 3
# from this many calibration inputs on (and without a validation option), a quarter of them is held out
HOLD_OUT = 4


def versus_eager(compiled, eager, inputs, budget_s: float = 1.0, rounds: int = 15) -> dict:
    """Interleaved medians (ms) of the compiled and the eager graph on `inputs`, and the decision."""
    from .timing import interleaved_medians

    with torch.no_grad():
        m = interleaved_medians({"compiled": compiled, "eager": eager}, inputs, rounds=rounds, warmup=1,
                                budget_s=budget_s, min_rounds=3)
    c, e = m["compiled"] * 1e3, m["eager"] * 1e3
    return {"compiled_ms": c, "eager_ms": e, "speedup": e / c if c > 0 else float("inf"),
            "use_compiled": c <= e * NOISE}


def symbolic_inputs(gm: fx.GraphModule) -> list[int]:
    """The indices of the inputs of dynamo's graph that are tensors with a symbolic size (batch, length)."""
    values = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, v in enumerate(values)
            if isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)]


def bucket_of(args, symbolic: list[int]) -> int | None:
    """The size class of one call of a graph with symbolic sizes: the largest element count among its
    inputs of symbolic size (`symbolic`, their indices), rounded up to a power of two. For a text encoder's
    token ids that is batch x length, the row count of its linears. None for a graph of static sizes."""
    if not symbolic:
        return None
    rows = max(max(args[i].numel() for i in symbolic), 1)
    return 1 << (rows - 1).bit_length()


def _version(t: torch.Tensor):
    """The in-place update counter; inference tensors (made under torch.inference_mode, e.g. a model built
    or loaded there) have none, so for them only a replaced or resized tensor is detected."""
    return None if t.is_inference() else t._version


class CompiledGraph:
    """One captured graph, frozen and lowered; refreezes if a frozen parameter is replaced or updated.

    Called by AOTAutograd with its boxed convention: one list of arguments, which the callee may clear."""

    _boxed_call = True

    def __init__(self, aten_gm: fx.GraphModule, frozen: list[int], real_inputs, options: Options,
                 examples=None, calibration=None, validation=None, torch_graph=None):
        self.aten_gm, self.frozen, self.options = aten_gm, frozen, options
        self.live = [i for i in range(len(real_inputs)) if i not in set(frozen)]
        # what torch.compile(backend="eager") would run: dynamo's torch-level graph, with the user's own
        # modules' kernels; it takes the same arguments as the ATen graph (None where AOT changed them)
        self.torch_graph = torch_graph
        self.runs_eager = False  # the whole compiled graph lost to it: the backend calls torch_graph instead
        # graphs of symbolic sizes: the whole-graph decision per size bucket (bucket_of), made on the first
        # call of each bucket (the first call of all is the one measured at compile time)
        self.buckets: dict[int, dict] = {}
        self._whole_key = None
        self.symbolic: list[int] = []  # which of dynamo's arguments have symbolic sizes (set by the backend)
        # real example inputs and calibration inputs (full argument lists), for approximate passes
        self.examples, self.calibration, self.validation = examples, calibration, validation
        self._build(real_inputs)

    def _build(self, args) -> None:
        from .inspect.stats import graph_stats, tag_new_nodes

        gm = capture.copy_graph_module(self.aten_gm)
        values = {i: args[i] for i in self.frozen}
        capture.freeze(gm, values)
        # the eager form timed against the compiled one where dynamo's own graph cannot be (AOT changed inputs)
        eager_gm = capture.copy_graph_module(gm) if self._measure_whole() and self.torch_graph is None else None
        before = {"code": gm.code, "stats": graph_stats(gm)}
        seen: set = set()
        tag_new_nodes(gm, seen, None)
        records = []

        def tagged(record, graph=None):  # the nodes this pass added carry its name (the report highlights them)
            record.added = tag_new_nodes(gm if graph is None else graph, seen, record.name)
            record.removed = record.nodes_before + record.added - record.nodes_after
            log_record(record)
            records.append(record)

        for p in default_pass_manager(self.options.disable_passes).passes:
            tagged(p(gm))
        from .passes.quantize import has_pt2e_ops, pt2e_int8

        if has_pt2e_ops(gm):  # a model quantized with PT2E: its int8 linears run as int8
            tagged(pt2e_int8(gm))
        notes, auto, approx = [], None, None
        if self.options.any_approximate or _has_trained_shift(gm):
            live = lambda full: [full[i] for i in self.live]  # noqa: E731
            examples = live(self.examples if self.examples is not None else args)
            # the original model's outputs (the graph after the exact passes) are every guard's reference
            decide_on, held_out = self._split_calibration(notes)
            cal = CalibrationSet.of([live(c) for c in decide_on], lambda a: gm(*a)) if decide_on else None
            val = CalibrationSet.of([live(c) for c in held_out], lambda a: gm(*a)) if held_out and cal else None
            base, kept_records = capture.copy_graph_module(gm), len(records)
            budget = self.options.accuracy_budget if self.options.accuracy_budget is not None else DEFAULT_BUDGET
            decide, held = budget, None
            if self.options.approximate is not None:  # approximate='auto': the search decides the options
                gm, auto = self._auto(gm, examples, cal, val, budget, tagged, notes)
            for attempt in range(0 if auto is not None else MAX_BACKOFFS + 1):
                gm = self._approximate(gm, examples, cal, decide, tagged)
                if val is None:
                    break
                held = Calibrated(None, val, self.options.metric, GuardResult("", budget)).loss(lambda a: gm(*a))
                notes.append(f"accuracy on {len(val)} held-out validation input(s): loss {held:.4g} (budget "
                             f"{budget:g}; the guards decided at {decide:.4g} on the calibration inputs)")
                if held <= budget:
                    break
                # back off: the passes again from the graph before them, with the budget scaled down
                del records[kept_records:]
                gm = capture.copy_graph_module(base)
                decide = decide * min(0.5, budget / held) if attempt < MAX_BACKOFFS - 1 else 0.0
            else:
                if auto is None:
                    notes.append("the held-out loss stayed over the budget: no approximate rewrite is kept")
            if cal is not None:  # what _budget_after_lowering checks the compiled model on
                check = val if val is not None else cal
                decided = [r.guard.loss for r in records if r.guard is not None and r.guard.loss is not None]
                # the back-off loop's last held-out loss is this graph's; else (no held-out inputs, or auto) measured
                rewritten = held if held is not None else Calibrated(
                    None, check, self.options.metric, GuardResult("", budget)).loss(lambda a: gm(*a))
                approx = {"inputs": check, "result": {
                    "budget": budget, "decided": decided[-1] if decided else None, "rewritten": rewritten,
                    "compiled": None, "action": None, "inputs": "held-out" if val is not None else "calibration"}}
        after = {"code": gm.code, "stats": graph_stats(gm), "graph": capture.copy_graph_module(gm)}
        publish("graphs", after["graph"])  # for effopt.autotune, which tunes the graphs the passes produce
        lowering = None
        if self.options.lower:
            from .lowering import lower

            gm, lowering = lower(gm, self.options)
            log_lowering(lowering)
            if approx is not None:
                gm = self._budget_after_lowering(gm, after["graph"], approx, notes)
        check = None
        self.buckets = {}
        if self._measure_whole():
            check = self._check_whole(gm, eager_gm, args, after["code"])
        # the report keeps the compiled graph (what effopt built, for inspection) even where eager runs
        self.runs_eager = check is not None and not check["use_compiled"]
        self.runtime = eager_gm if self.runs_eager and self.torch_graph is None else gm
        self.guards = [(i, t.data_ptr(), _version(t), t.shape) for i, t in values.items()]
        self.report = Report(records, lowering, gm, before=before, after=after, versus_eager=check, notes=notes,
                             auto=auto, budget=approx["result"] if approx is not None else None,
                             runs_eager=self.runs_eager)
        set_last_report(self.report)

    def _budget_after_lowering(self, gm, rewritten, approx: dict, notes: list):
        """The accuracy budget judged on what runs: the lowered model's loss on the held-out inputs (the
        calibration inputs where none are held out), beside the loss the guards decided on. Kernels are only
        self-checked one region at a time, on random inputs, within each op's tolerance, so lowering can
        move a guarded model past its budget; then the rewritten graph runs in its torch form, with a
        warning. Returns the graph to run."""
        from .passes.guard import EffoptAccuracyWarning

        inputs, result = approx["inputs"], approx["result"]
        which, budget = result["inputs"], result["budget"]
        compiled = Calibrated(None, inputs, self.options.metric, GuardResult("", budget)).loss(lambda a: gm(*a))
        result["compiled"] = compiled
        notes.append(f"accuracy of the compiled model on the {len(inputs)} {which} input(s): loss {compiled:.4g} "
                     f"(before lowering {result['rewritten']:.4g}; the guards decided at "
                     f"{result['decided'] if result['decided'] is not None else float('nan'):.4g}; budget "
                     f"{budget:g})")
        if compiled <= budget:
            return gm
        result["action"] = "the rewritten graph runs in its torch form (lowering pushed the loss over the budget)"
        warnings.warn(f"effopt: the compiled model's {self.options.metric} loss on the {which} inputs is "
                      f"{compiled:.4g}, over the budget {budget:g} (before lowering: {result['rewritten']:.4g}): "
                      "a kernel moved the result; the rewritten graph runs in its torch form instead of the "
                      "compiled kernels", EffoptAccuracyWarning, stacklevel=2)
        notes.append(f"over the budget after lowering: {result['action']}")
        return capture.copy_graph_module(rewritten)

    def _auto(self, gm, examples, cal, val, budget, tagged, notes):
        """approximate='auto' (effopt/auto.py): the stored choice for this graph, target, budget, metric and
        calibration, or a search; then the chosen options' passes on gm. Returns (gm, the search's record)."""
        from .auto import digest, search, with_settings
        from .lowering import lower
        from .lowering.cache import make_key
        from .timing import interleaved_medians

        config, metric = self.options.approximate, self.options.metric
        store = self._decisions()
        key = make_key(gm.code, digest(cal, budget, metric), str(config))
        saved = store.load("auto").get(key) if store else None
        if isinstance(saved, dict) and isinstance(saved.get("chosen"), dict):
            info = dict(saved, reused=True)
        else:
            check = val if val is not None else cal
            inputs = self._example_inputs(examples)
            plain = with_settings(self.options, {})
            exact = lower(capture.copy_graph_module(gm), plain)[0] if self.options.lower else gm

            def evaluate(settings: dict) -> dict:
                opts = with_settings(self.options, settings)
                g, recs = self._pipeline(capture.copy_graph_module(gm), opts, examples, cal, budget)
                held = Calibrated(None, check, metric, GuardResult("", budget)).loss(lambda a: g(*a))
                decided = [r.guard.loss for r in recs if r.guard is not None and r.guard.loss is not None]
                lowered = lower(g, opts)[0] if self.options.lower else g
                with torch.no_grad():
                    m = interleaved_medians({"candidate": lowered, "exact": exact}, inputs, rounds=9, warmup=1,
                                            budget_s=2.0, min_rounds=3)
                return {"ms": m["candidate"] / m["exact"], "loss": decided[-1] if decided else 0.0,
                        "held_out": held, "within": held <= budget, "matches": sum(r.matches for r in recs),
                        "rewrites": {r.name: r.matches for r in recs}}

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = dict(search(evaluate, config), reused=False)
            if store:
                store.save("auto", {**store.load("auto"), key: {k: info[k] for k in ("chosen", "candidates",
                                                                                     "seconds", "speedup_over_exact")}})
        chosen = info["chosen"]
        picked = next((c for c in info["candidates"] if c.get("settings") == chosen), None)
        if picked is not None and val is not None:
            notes.append(f"accuracy on {len(val)} held-out validation input(s): loss "
                         f"{picked['held_out']:.4g} (budget {budget:g}; measured by the search)")
        notes.append(f"approximate=auto: {'applied the stored choice' if info['reused'] else 'searched'} "
                     f"{' + '.join(f'{k}={v}' for k, v in chosen.items()) or 'no approximate option (none paid off)'}"
                     f" ({info['speedup_over_exact']:.2f}x the exact compile; {len(info['candidates'])} "
                     f"candidate(s) measured{' in an earlier compile' if info['reused'] else ''})")
        gm, _ = self._pipeline(gm, with_settings(self.options, chosen), examples, cal, budget, tagged)
        return gm, info

    @staticmethod
    def _example_inputs(examples: list) -> list:
        """The live example inputs as real values (random stand-ins where only fake ones are known)."""
        from .lowering.select import concrete

        gen = torch.Generator().manual_seed(0)
        return [a if isinstance(a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor)
                else concrete(a, gen) for a in examples]

    def _split_calibration(self, notes: list) -> tuple[list | None, list | None]:
        """(the inputs the guards decide on, the held-out inputs they are verified on): the validation
        option's where given; else, from HOLD_OUT calibration inputs on, the last quarter of them (the
        validation=False option keeps them all for deciding)."""
        cal, val = self.calibration, self.validation
        if not cal or val is not None or self.options.validation is False or len(cal) < HOLD_OUT:
            return cal, val or None
        k = len(cal) // 4
        notes.append(f"held out the last {k} of the {len(cal)} calibration inputs: the guards decided on the "
                     f"first {len(cal) - k} (validation=False decides on all)")
        return cal[:-k], cal[-k:]

    def _approximate(self, gm, examples, cal, budget, tagged):
        """The approximate passes the options ask for, under `budget`."""
        return self._pipeline(gm, self.options, examples, cal, budget, tagged)[0]

    @staticmethod
    def _pipeline(gm, options, examples, cal, budget, on_record=None):
        """The approximate passes of `options` as one pipeline (effopt.passes.approximate_passes), guarded at
        `budget` on `cal` (no calibration: unguarded, with the passes' warning); (graph, records)."""
        from .passes import GuardContext, PassManager, approximate_passes

        ctx = GuardContext(examples, cal, budget if cal is not None else None, options.metric)
        return PassManager(approximate_passes(options, ctx, trained_shift=_has_trained_shift(gm))).run(
            gm, on_record=on_record)

    def _measure_whole(self) -> bool:
        """kernel_choice='measure' (the default) with lowering: the whole compiled graph is timed too."""
        return self.options.lower and self.options.kernel_choice is KernelChoice.MEASURE

    def _check_whole(self, gm, eager_gm, args, code: str) -> dict:
        """The compiled graph against what eager PyTorch runs (dynamo's torch-level graph, as
        torch.compile(backend="eager") would), on the example inputs (random stand-ins where only fake ones
        are known); where it loses beyond noise, eager runs, with one warning. The decision is stored with
        the kernel decisions, so that a warm process does not measure it again."""
        from .lowering.cache import make_key

        full = self._example_inputs(self.examples if self.examples is not None else args)
        live = [full[i] for i in self.live]
        store = self._decisions()
        # the graph the passes produced (approximate rewrites included), the shapes, and the options that
        # change what lowering builds
        o = self.options
        shapes = [[list(a.shape), str(a.dtype)] if isinstance(a, torch.Tensor) else repr(a) for a in live]
        key = make_key("whole-graph", code, json.dumps(shapes), str(self.torch_graph is None),
                       repr((o.tuning, o.freeze, o.disable_passes, o.attention)))
        self._whole_key = key
        saved = store.load("whole_graph").get(key) if store else None
        if isinstance(saved, dict) and isinstance(saved.get("use_compiled"), bool):
            check = dict(saved, reused=True)
        else:
            if self.torch_graph is not None:
                eager = lambda *_: self.torch_graph(*full)  # noqa: E731
                check = versus_eager(lambda *_: gm(*live), eager, [])
            else:
                check = versus_eager(gm, eager_gm, live)
            check["eager"] = "torch graph" if self.torch_graph is not None else "aten graph"
            if store:
                store.save("whole_graph", {key: check})
            check = dict(check, reused=False)
        if not check["use_compiled"]:
            warnings.warn(f"effopt: the compiled graph measured slower than eager PyTorch on this CPU "
                          f"({check['compiled_ms']:.3g} ms against {check['eager_ms']:.3g} ms on the example "
                          f"inputs{', measured in an earlier compile' if check['reused'] else ''}): this graph "
                          "runs in eager (kernel_choice='tvm' keeps the compiled one)",
                          EffoptSlowerWarning, stacklevel=2)
        return check

    def compiled_for(self, bucket: int | None, args, compiled, eager) -> bool:
        """Whether the compiled graph runs for this call (dynamo's arguments `args`, of size bucket `bucket`,
        bucket_of); `compiled` and `eager` take them. A graph of static sizes keeps the decision its compile
        made. A graph of symbolic sizes decides per size bucket: the first call (the size it was compiled and
        checked at) takes the compile's decision, and so does every bucket where that decision was clear
        (buckets.close_call: won or lost by more than its MARGIN, as a region's choice); else the first call
        of each other bucket takes the one stored by an earlier process, or times both on its own arguments
        (one measurement: 4 calls of each) and stores it."""
        check = self.report.versus_eager
        if bucket is None or check is None or self.torch_graph is None or self._whole_key is None:
            return not self.runs_eager
        got = self.buckets.get(bucket)
        if got is None:
            got = self.buckets[bucket] = self._decide_bucket(bucket, args, compiled, eager, first=not self.buckets)
            check.setdefault("buckets", {})[bucket] = got
        return got["use_compiled"]

    def _decisions(self):
        """The decision store of this target (None with cache=False): the whole-graph, per-bucket and auto
        decisions live there."""
        from .lowering.cache import DecisionStore
        from .target import target_dict

        return DecisionStore(self.options.cache_dir, target_dict(self.options.target)) if self.options.cache else None

    def _decide_bucket(self, bucket: int, args, compiled, eager, first: bool) -> dict:
        from .lowering.cache import make_key

        compiled_check = {k: v for k, v in self.report.versus_eager.items() if k != "buckets"}
        if first:
            return compiled_check
        if not close_call({"compiled": compiled_check["compiled_ms"], "eager": compiled_check["eager_ms"]}):
            return dict(compiled_check, margin=True)  # a clear decision holds
        store = self._decisions()
        key = make_key(self._whole_key, f"rows <= {bucket}")
        saved = store.load("whole_graph").get(key) if store else None
        if isinstance(saved, dict) and isinstance(saved.get("use_compiled"), bool):
            return dict(saved, reused=True)

        def run_compiled():
            with size_bucket(bucket):  # its regions serve this bucket (lowering/buckets.py)
                return compiled(*args)

        check = versus_eager(run_compiled, lambda: eager(*args), [], budget_s=0.5, rounds=3)
        if store:
            store.save("whole_graph", {key: check})
        return dict(check, reused=False)

    def _stale(self, args) -> bool:
        for i, ptr, ver, shape in self.guards:
            t = args[i]
            if t.data_ptr() != ptr or _version(t) != ver or t.shape != shape:
                return True
        return False

    def __call__(self, args):
        if self._stale(args):
            self._build(args)
        live = [args[i] for i in self.live]
        args.clear()  # boxed calling convention: drop references early so inputs can be freed
        out = self.runtime(*live)
        return out if isinstance(out, (tuple, list)) else (out,)


def _has_trained_shift(gm) -> bool:
    from .passes.shift_add import has_trained_layers

    return has_trained_layers(gm)


def _inference_compiler(real_inputs, frozen, options, calibration=None, validation=None, torch_graph=None,
                        built=None):
    def fw_compiler(gm: fx.GraphModule, fake_inputs):
        same = len(fake_inputs) == len(real_inputs)
        # AOT added or removed inputs (input mutation, aliasing): freeze nothing rather than guess.
        frozen_here = frozen if options.freeze and same else []
        if options.any_approximate and not same:
            raise RuntimeError("approximate options need the graph's inputs to be the model's inputs, but "
                               "AOTAutograd changed them (input mutation or aliasing)")
        # AOT calls us inside its fake mode; freezing and measuring kernels need real tensors.
        with unset_fake_temporarily():
            compiled = CompiledGraph(gm, frozen_here, list(real_inputs) if frozen_here else list(fake_inputs), options,
                                     examples=list(real_inputs) if same else None, calibration=calibration,
                                     validation=validation, torch_graph=torch_graph if same else None)
        if built is not None:
            built.append(compiled)
        return compiled
    return fw_compiler


def _training_compiler(options):
    def fw_compiler(gm, fake_inputs):
        with unset_fake_temporarily():
            gm, records = default_pass_manager(options.disable_passes).run(gm)
            lowering = None
            if options.lower:
                from .lowering import lower

                gm, lowering = lower(gm, options)
        set_last_report(Report(records, lowering, gm))
        return make_boxed_func(gm.forward)
    return fw_compiler


def _needs_grad(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _eager_fallback(gm, why: str, options: Options):
    if options.strict:
        raise RuntimeError(f"effopt: compilation failed and strict=True: {why}")
    warnings.warn(f"effopt: running this graph in eager PyTorch because compilation failed: {why}",
                  EffoptFallbackWarning, stacklevel=3)
    return gm.forward


def effopt_backend(gm: fx.GraphModule, example_inputs, options: dict | Options | None = None, **kw):
    """The `backend="effopt"` entry point: `torch.compile(model, backend="effopt", options={...})`."""
    opts = Options.from_dict({**(options if isinstance(options, dict) else {}), **kw}) \
        if not isinstance(options, Options) else options
    global _warned_training
    calibration = validation = None
    if opts.any_approximate and opts.calibration is not None:
        from .passes.guard import calibration_arguments

        calibration = calibration_arguments(gm, example_inputs, opts.calibration)  # ValueError: the user's to fix
        if opts.validation is not None and opts.validation is not False:
            validation = calibration_arguments(gm, example_inputs, opts.validation)
    try:
        if _needs_grad(example_inputs):
            if opts.any_approximate:
                warnings.warn("effopt: approximate options apply to inference graphs (no_grad/inference_mode); "
                              "to fine-tune an approximate model, use effopt.reparameterize", EffoptFallbackWarning,
                              stacklevel=2)
            # Autograd needs the parameters as live inputs: no freezing; the backward runs in eager.
            if not _warned_training:
                warnings.warn("effopt: this graph needs gradients (grad mode on and inputs that require grad); "
                              "parameters are not frozen and the backward pass runs in eager PyTorch. "
                              "Wrap inference in torch.no_grad() or torch.inference_mode() for the full speed-up.",
                              EffoptFallbackWarning, stacklevel=2)
                _warned_training = True
            return aot_module_simplified(gm, example_inputs, fw_compiler=_training_compiler(opts),
                                         bw_compiler=lambda g, _: make_boxed_func(g.forward))
        frozen = capture.frozen_input_indices(gm, example_inputs)
        built: list = []
        compiled = aot_module_simplified(gm, example_inputs, fw_compiler=_inference_compiler(
            example_inputs, frozen, opts, calibration, validation, torch_graph=gm, built=built))
        if built:
            built[0].symbolic = symbolic_inputs(gm)
        return _dispatch(compiled, gm, built[0] if built else None)
    except torch._dynamo.exc.RestartAnalysis:  # dynamo's own signal to trace again (e.g. scalars to tensors)
        raise
    except Exception as e:  # noqa: BLE001 - any failure in TVM or our passes must not break the user's model
        if opts.strict:
            raise
        return _eager_fallback(gm, f"{type(e).__name__}: {e}", opts)


def _dispatch(compiled, torch_graph: fx.GraphModule, graph: CompiledGraph | None):
    """The compiled function, or dynamo's own torch-level graph where the whole compiled graph lost to it (the
    graph decides at each rebuild, and per size bucket where its sizes are symbolic; eager needs no rebuild:
    it reads the live parameters)."""
    if graph is None or graph.torch_graph is None:
        return compiled

    def run(*args):
        bucket = bucket_of(args, graph.symbolic)
        if graph.compiled_for(bucket, args, compiled, torch_graph):
            with size_bucket(bucket):  # regions that choose per size bucket
                return compiled(*args)
        return torch_graph(*args)

    return run


def backend(**options):
    """`effopt.backend(target="llvm", ...)`: the backend with options bound, for `torch.compile(backend=...)`."""
    opts = Options.from_dict(options)
    return functools.wraps(effopt_backend)(functools.partial(effopt_backend, options=opts))
