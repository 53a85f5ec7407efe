"""The `attention` option: exact softmax attention, or an approximate kind per layer.

The kinds are declared where they are implemented (effopt/passes/approximate.py registers each kind's
parameters, defaults, checks and op); this module parses and validates the option against them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .common import check_parameters


@dataclass(frozen=True)
class AttentionKind:
    """What the option parser knows of an attention kind: its parameters (with defaults) and a check of their
    values (raising ValueError). The pass's entry (effopt.passes.approximate) subclasses it with the op."""

    name: str
    params: dict
    check: Callable[["AttentionConfig"], None] = lambda cfg: None


KINDS: dict[str, AttentionKind] = {"exact": AttentionKind("exact", {})}


def register_kind(kind: AttentionKind) -> AttentionKind:
    KINDS[kind.name] = kind
    return kind


def approximate_kinds() -> list[str]:
    return [k for k in KINDS if k != "exact"]


@dataclass(frozen=True)
class AttentionConfig:
    kind: str = "exact"
    params: tuple = ()
    """(name, value) for every parameter of `kind` and of its fallbacks (defaults filled in); read them as
    attributes: `config.bits`."""
    fallback: tuple[str, ...] = ()
    """other approximate kinds, in order, for a layer whose `kind` exceeds the budget (per layer: each layer
    keeps the first kind that holds, or stays exact); their parameters are this config's."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            for key, value in object.__getattribute__(self, "params"):
                if key == name:
                    return value
        raise AttributeError(f"attention {object.__getattribute__(self, 'kind')!r} has no parameter {name!r}")

    @classmethod
    def parse(cls, value) -> "AttentionConfig":
        if isinstance(value, AttentionConfig):
            return value
        given = value
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, dict) or value.get("kind") not in KINDS:
            raise ValueError(f"attention={given!r} is invalid; valid: {list(KINDS)} or a dict "
                             "{'kind': ..., parameters}, e.g. {'kind': 'hamming', 'bits': 128}")
        kind = value["kind"]
        fb = value.get("fallback", ())
        fb = (fb,) if isinstance(fb, str) else tuple(fb)
        others = [k for k in approximate_kinds() if k != kind]
        if any(k not in others for k in fb) or len(set(fb)) != len(fb):
            raise ValueError(f"attention fallback={value.get('fallback')!r}; valid: other approximate kinds from "
                             f"{others}")
        own = tuple(KINDS[kind].params)
        check_parameters(f"attention {kind!r}", value, own + (("fallback",) if kind != "exact" else ()),
                         implicit=("kind",))
        params = {}
        for k in (*fb[::-1], kind):  # the kind's own values win
            params.update(KINDS[k].params)
        params.update({k: v for k, v in value.items() if k not in ("kind", "fallback")})
        cfg = cls(kind, tuple(params.items()), fb)
        for k in (kind, *fb):
            KINDS[k].check(cfg)
        return cfg

    def __str__(self) -> str:
        if self.kind == "exact":
            return "exact"
        params = ", ".join(f"{p}={getattr(self, p)}" for p in KINDS[self.kind].params)
        fallback = f", fallback={'/'.join(self.fallback)}" if self.fallback else ""
        return f"{self.kind}({params}{fallback})"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds a layer may take, in order of preference."""
        return (self.kind, *self.fallback)
