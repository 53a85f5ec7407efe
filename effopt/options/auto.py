"""The `approximate="auto"` option: which families effopt.auto searches, and for how long."""
from __future__ import annotations

import re
from dataclasses import dataclass

FAMILIES = ("tokens", "attention", "shift_add", "quantize")


@dataclass(frozen=True)
class AutoConfig:
    families: tuple[str, ...] = FAMILIES
    time_budget_s: float = 600.0

    @classmethod
    def parse(cls, value) -> "AutoConfig | None":
        if value is None or value is False:
            return None
        if value == "auto":
            return cls()
        if not isinstance(value, dict) or value.get("kind", "auto") != "auto":
            raise ValueError(f"approximate={value!r} is invalid; valid: 'auto' or a dict {{'kind': 'auto', "
                             f"'families': {list(FAMILIES)}, 'time_budget': '10m'}}")
        bad = sorted(set(value) - {"kind", "families", "time_budget"})
        if bad:
            raise ValueError(f"approximate has no parameter(s) {bad}; valid: ['families', 'time_budget']")
        fams = value.get("families", FAMILIES)
        if isinstance(fams, str) or not fams or any(f not in FAMILIES for f in fams):
            raise ValueError(f"approximate families={fams!r} is invalid; valid: a list from {list(FAMILIES)}")
        return cls(tuple(f for f in FAMILIES if f in fams), _seconds(value.get("time_budget", 600)))

    def __str__(self) -> str:
        return f"auto(families={list(self.families)}, time_budget={self.time_budget_s:g}s)"


def _seconds(v) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", str(v))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"approximate time_budget={v!r} is invalid; valid: seconds (a number) or a string "
                         "such as '90s', '10m', '1h'")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
