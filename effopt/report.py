"""The record of the last compile: pass records, lowering decisions, fallbacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LAST: list = [None]


@dataclass
class Report:
    passes: list
    lowering: Any
    graph: Any

    def __str__(self) -> str:
        lines = ["effopt report", "passes:"]
        lines += [f"  {r}" for r in self.passes]
        if self.lowering is not None:
            lines.append(str(self.lowering))
        return "\n".join(lines)

    def rewrites(self) -> dict[str, int]:
        return {r.name: r.matches for r in self.passes}


def set_last_report(report: Report) -> None:
    _LAST[0] = report


def last_report() -> Report | None:
    """The report of the most recent graph effopt compiled in this process."""
    return _LAST[0]
