"""Autotuning stage: hardware targets (and, later, MetaSchedule tuning with a persistent database)."""
from .targets import resolve_target

__all__ = ["resolve_target"]
