"""Hardware targets: 'host', named targets, or any TVM JSON target dict.

TVM 0.27's `Target` takes JSON dicts only (CLI strings such as "llvm -mcpu=..." are refused),
so every spelling a user may write is normalised to a dict here.
"""
from __future__ import annotations

import json
import os
from typing import Any

NAMED_TARGETS: dict[str, dict[str, Any]] = {
    "llvm": {"kind": "llvm"},
    "cuda": {"kind": "cuda"},
}


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:  # psutil missing or unable to read the topology
        pass
    return os.cpu_count() or 1


def host_target_dict() -> dict[str, Any]:
    """The CPU this process runs on, as effopt.host describes it: LLVM's name for it (which carries its
    feature flags), cross-checked with the CPU's own flags and limited by EFFOPT_HOST_ISA / EFFOPT_HOST_CPU."""
    from .host import host

    # fast-math-reassoc lets LLVM vectorize float sums and maxima (row reductions in softmax and norms);
    # it only reorders additions, within the float tolerances every kernel is checked against.
    return {"kind": "llvm", "mcpu": host().llvm_cpu, "num-cores": physical_cores(), "fast-math-reassoc": True}


def target_dict(spec: str | dict) -> dict[str, Any]:
    """Normalise a user's target spelling to a TVM JSON dict; ValueError names the valid spellings."""
    if isinstance(spec, dict):
        if "kind" not in spec:
            raise ValueError(f"target dict {spec!r} has no 'kind'; e.g. {{'kind': 'llvm', 'num-cores': 2}}")
        return dict(spec)
    if not isinstance(spec, str):
        raise ValueError(f"target must be a str or dict, got {type(spec).__name__}")
    s = spec.strip()
    if s == "host":
        return host_target_dict()
    if s in NAMED_TARGETS:
        return dict(NAMED_TARGETS[s])
    if s.startswith("{"):
        try:
            return target_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise ValueError(f"target {spec!r} is not valid JSON: {e}") from None
    valid = ["host", *NAMED_TARGETS, "a TVM JSON target dict such as {\"kind\": \"llvm\", \"mcpu\": \"znver4\"}"]
    raise ValueError(f"unknown target {spec!r}; valid: {', '.join(valid)}")


def resolve_target(spec: str | dict):
    """A `tvm.target.Target` for a user's spelling; TVM's own error is turned into a ValueError."""
    import tvm

    d = target_dict(spec)
    try:
        return tvm.target.Target(d)
    except Exception as e:  # TVM raises its own error types for unknown kinds/attributes
        raise ValueError(f"TVM refused target {d!r}: {e}") from None


def has_feature(target, feature: str) -> bool:
    """Whether LLVM's description of `target` (a tvm Target) has `feature` (an LLVM feature name)."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - an LLVM without that query, or a feature it does not know
        return False


# the integer dot products an int8 kernel is generated for, best first, with the LLVM features each needs
INT8_DOT_PRODUCTS = (("avx512vnni", ("avx512vnni", "avx512bw")), ("avxvnni", ("avxvnni", "avx2")),
                     ("avx2", ("avx2",)), ("neon-i8mm", ("i8mm",)), ("neon-dot", ("dotprod",)))


def int8_dot_product(target) -> str | None:
    """The best integer dot product of `target` (a tvm Target, or a spelling resolve_target takes), by name
    ("avx512vnni", "avxvnni", "avx2", "neon-i8mm", "neon-dot"), or None where it has none worth a kernel."""
    if isinstance(target, (str, dict)):
        target = resolve_target(target)
    keys = set(target.keys) if target is not None else set()
    if "cpu" not in keys:
        return None
    arm = "arm_cpu" in keys
    for name, features in INT8_DOT_PRODUCTS:
        if name.startswith("neon") == arm and all(has_feature(target, f) for f in features):
            return name
    return None
