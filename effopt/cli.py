"""The `effopt` command.

    effopt inspect MODEL.py [--options JSON] [--html report.html] [--json report.json] [--no-profile]
    effopt tune MODEL.py [--target host|llvm|cuda|JSON] [--trials 500] [--time-budget 2h]
                         [--rpc-tracker HOST:PORT --rpc-key KEY] [--options JSON] [--cache-dir DIR]
    effopt tune --report [--target ...] [--cache-dir DIR]

MODEL.py names its model by a convention: it defines `effopt_model()`, returning `(model, example_inputs)`
(example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs), and, for options
that need calibration data (`quantize="int8"`, `accuracy_budget`), optionally `effopt_calibration()`,
returning a list of such inputs. `examples/vit.py` is one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys


def load_model_file(path: str):
    """(model, example_inputs, calibration or None) from a model file (the convention above)."""
    if not os.path.isfile(path):
        raise SystemExit(f"effopt: no such model file: {path}")
    spec = importlib.util.spec_from_file_location("effopt_user_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    if not callable(getattr(module, "effopt_model", None)):
        raise SystemExit(f"effopt: {path} defines no effopt_model(); it should return (model, example_inputs), "
                         "e.g. def effopt_model(): return MyModel().eval(), (torch.randn(1, 3, 224, 224),)")
    model, inputs = module.effopt_model()
    cal = module.effopt_calibration() if callable(getattr(module, "effopt_calibration", None)) else None
    return model, inputs, cal


def _options(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"effopt: --options is not JSON ({e}); e.g. --options '{{\"token_merge\": 8}}'")
    if not isinstance(options, dict):
        raise SystemExit("effopt: --options must be a JSON object, e.g. '{\"quantize\": \"int8-dynamic\"}'")
    return options


def parse_duration(text: str | None) -> float | None:
    """Seconds from '90', '90s', '30m', '2h' or '1h30m'; ValueError otherwise."""
    import re

    if text is None:
        return None
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or parts is None or not any(parts.groups()):
        raise ValueError(f"time budget {text!r} is not a duration; e.g. 90s, 30m, 2h, 1h30m")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def _tune(args) -> int:
    from .target import target_dict

    try:
        target = json.loads(args.target) if args.target.strip().startswith("{") else args.target
        target_dict(target)
    except (ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"effopt: --target: {e}")
    if args.report:
        return _tune_report(target, args.cache_dir)
    if not args.model:
        raise SystemExit("effopt tune: name a model file (effopt tune examples/vit.py), or --report")
    options = _options(args.options)
    try:
        budget = parse_duration(args.time_budget)
    except ValueError as e:
        raise SystemExit(f"effopt: --time-budget: {e}")
    model, inputs, cal = load_model_file(args.model)
    if cal is not None and "calibration" not in options and (options.get("quantize") or options.get("accuracy_budget")):
        options["calibration"] = cal
    from .autotune.tune import autotune

    try:
        report = autotune(model.eval(), inputs, target=target, trials=args.trials, time_budget=budget,
                          rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, cache_dir=args.cache_dir,
                          options=options, remeasure=args.remeasure)
    except ValueError as e:
        raise SystemExit(f"effopt: {e}")
    print(report)
    if report.stopped:
        print(f"stopped early: {report.stopped}")
    print("later compiles for this target use the tuned choices: torch.compile(model, backend=\"effopt\")")
    return 0


def _tune_report(target, cache_dir) -> int:
    from .lowering.tuning_db import TuningDatabase
    from .autotune.tune import TaskResult, result_from_choice, format_table, tuning_target

    db = TuningDatabase.open(tuning_target(target, False), cache_dir)
    choices = db.choices()
    if not choices:
        print(f"no tuning records for this target yet ({db.path}); run: effopt tune MODEL.py --target ...")
        return 0
    results = []
    for key, c in choices.items():
        r = TaskResult(key, c.get("kind", "?"), c.get("name", key), int(c.get("weight") or 0),
                       float(c.get("flops") or 0), int(c.get("trials") or 0))
        results.append(result_from_choice(r, c))
    print(format_table(results, db.target, db.path))
    return 0


def _inspect(args) -> int:
    import effopt

    options = _options(args.options)
    model, inputs, cal = load_model_file(args.model)
    if cal is not None and "calibration" not in options:
        options["calibration"] = cal
    try:
        report = effopt.explain(model.eval(), inputs, profile=not args.no_profile, **options)
    except ValueError as e:
        raise SystemExit(f"effopt: {e}")
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        print(f"JSON report: {args.json}")
    if args.html:
        report.save_html(args.html)
        print(f"HTML report: {args.html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="effopt", description="effopt: a torch.compile backend through Apache TVM")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="compile a model file's model and report what each pass did, what fell "
                                       "back to eager and where the time goes")
    p.add_argument("model", help="a Python file defining effopt_model() -> (model, example_inputs)")
    p.add_argument("--options", default="{}", help="backend options as JSON, e.g. '{\"token_merge\": 8}'")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--no-profile", action="store_true", help="skip timing each kernel on the example inputs")
    t = sub.add_parser("tune", help="autotune every kernel of a model file's model for a target, into the tuning "
                                    "database that later compiles use; or --report what is tuned")
    t.add_argument("model", nargs="?", help="a Python file defining effopt_model() -> (model, example_inputs)")
    t.add_argument("--target", default="host", help="host (this CPU), llvm, cuda, or a TVM JSON target dict, e.g. "
                                                     "'{\"kind\":\"cuda\",\"arch\":\"sm_90\"}' (default: host)")
    t.add_argument("--trials", type=int, default=500, help="MetaSchedule trials over all kernels (default 500)")
    t.add_argument("--time-budget", help="stop after this long, e.g. 30m or 2h (the records so far are kept)")
    t.add_argument("--rpc-tracker", help="measure on devices registered with this TVM RPC tracker (host:port)")
    t.add_argument("--rpc-key", help="the device key the RPC servers registered under")
    t.add_argument("--options", default="{}", help="backend options as JSON (the graph that is tuned is the graph "
                                                    "these options compile to)")
    t.add_argument("--cache-dir", help="effopt's cache directory (default $EFFOPT_CACHE_DIR or ~/.cache/effopt)")
    t.add_argument("--remeasure", action="store_true", help="compare default and tuned kernels again where no "
                                                              "trials were added (after tuning on a busy machine)")
    t.add_argument("--report", action="store_true", help="print each tuned kernel: default vs tuned latency, "
                                                          "GFLOPS, trials")
    args = ap.parse_args(argv)
    if args.command == "tune":
        if args.trials < 0:
            raise SystemExit("effopt: --trials must be >= 0")
        return _tune(args)
    return _inspect(args)


if __name__ == "__main__":
    sys.exit(main())
