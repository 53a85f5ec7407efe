"""EFFOPT_LOG: effopt's logs while torch.compile runs, as TORCH_LOGS does for PyTorch.

    EFFOPT_LOG=passes,lowering python train.py

Channels: `passes` (each pass's record as it finishes: matches, source lines, guard decisions), `lowering`
(each compile's lowering record: kernels, library calls, fallbacks), `guard` (the accuracy guard's per-layer
decisions as they are made), or `all`. They go to standard error through Python's logging, under the loggers
`effopt.passes`, `effopt.lowering` and `effopt.guard`, so an application can also route them itself.
"""
from __future__ import annotations

import logging
import os
import warnings

CHANNELS = ("passes", "lowering", "guard", "tune")
_configured: list = []


def parse(value: str) -> list[str]:
    """The channels an EFFOPT_LOG value names; unknown names are a ValueError naming the valid ones."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if "all" in names:
        return list(CHANNELS)
    bad = [n for n in names if n not in CHANNELS]
    if bad:
        raise ValueError(f"EFFOPT_LOG names unknown channel(s) {bad}; valid: {[*CHANNELS, 'all']}")
    return names


def configure(value: str | None = None) -> list[str]:
    """Turn on the channels of `value` (default: the EFFOPT_LOG environment variable); returns them."""
    value = os.environ.get("EFFOPT_LOG", "") if value is None else value
    try:
        channels = parse(value)
    except ValueError as e:
        warnings.warn(f"effopt: {e}", stacklevel=2)
        return []
    for name in channels:
        logger = logging.getLogger(f"effopt.{name}")
        if name not in _configured:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(f"[effopt.{name}] %(message)s"))
            logger.addHandler(handler)
            _configured.append(name)
        logger.setLevel(logging.INFO)
    return channels


_warned: set = set()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """A warning the first time `key` comes up in this process (a schedule step that could not be applied
    is the same on every kernel of its kind: one line says so, not hundreds)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


def log_record(record) -> None:
    logging.getLogger("effopt.passes").info("%s", record)


def log_lowering(record) -> None:
    logging.getLogger("effopt.lowering").info("%s", record)


__all__ = ["configure", "parse", "log_record", "log_lowering", "warn_once", "CHANNELS"]
