"""The `effopt` command.

    effopt inspect MODEL.py [--options JSON] [--html report.html] [--json report.json] [--no-profile]

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


def _inspect(args) -> int:
    import effopt

    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise SystemExit(f"effopt: --options is not JSON ({e}); e.g. --options '{{\"token_merge\": 8}}'")
    if not isinstance(options, dict):
        raise SystemExit("effopt: --options must be a JSON object, e.g. '{\"quantize\": \"int8-dynamic\"}'")
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
    args = ap.parse_args(argv)
    return _inspect(args)


if __name__ == "__main__":
    sys.exit(main())
