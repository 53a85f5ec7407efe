"""Autotuning stage: hardware targets, task extraction, MetaSchedule tuning into a persistent per-target
database (database.py), and the tuned choices that every later compile applies (apply.py)."""
from ..target import resolve_target


def autotune(*args, **kwargs):
    """effopt.autotune.tune.autotune (imported on first use: it loads MetaSchedule)."""
    from .tune import autotune as _autotune

    return _autotune(*args, **kwargs)


__all__ = ["resolve_target", "autotune"]


class _CallableModule(__import__("types").ModuleType):
    """`effopt.autotune(model, example_inputs, ...)` calls autotune; the package stays importable."""

    def __call__(self, *args, **kwargs):
        return autotune(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
