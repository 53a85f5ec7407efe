"""What a pass did, kept for `effopt.last_report()` and the inspection report."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..graph import source_location


@dataclass
class PassRecord:
    name: str
    matches: int = 0
    locations: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    guard: object = None  # the accuracy guard's result, for approximate passes (effopt.passes.guard.GuardResult)
    tokens: list[int] = field(default_factory=list)  # token reduction: tokens entering each block, then at the end
    layers: list[dict] = field(default_factory=list)  # shift_add: per rewritten layer, what it saves
    added: int | None = None  # nodes the pass added and removed (the backend counts them for the report)
    removed: int | None = None

    def add_match(self, node: fx.Node | None = None) -> None:
        self.matches += 1
        loc = source_location(node) if node is not None else None
        if loc and loc not in self.locations:
            self.locations.append(loc)

    def __str__(self) -> str:
        where = f" at {', '.join(self.locations[:3])}" + (" ..." if len(self.locations) > 3 else "") if self.locations else ""
        change = f" (+{self.added} -{self.removed})" if self.added is not None else ""
        return (f"{self.name}: {self.matches} match(es){where}; nodes {self.nodes_before} -> {self.nodes_after}{change}"
                f" ({self.seconds * 1e3:.1f} ms)" + "".join(f"\n    {n}" for n in self.notes)
                + "".join(f"\n    {_layer_line(d)}" for d in self.layers))


def _layer_line(d: dict) -> str:
    """One rewritten layer's savings (shift_add)."""
    path = f"int{d['activation_bits']}" if d["activation_bits"] else "float"
    return (f"{d['layer']}: {d['tokens']}x{d['out']}x{d['in']}, {d['terms']} term(s), {path}: multiplications "
            f"{d['multiplications_before']:,} -> {d['multiplications_after']:,}, weights "
            f"{d['weight_bytes_before'] / 1024:.0f} -> {d['weight_bytes_after'] / 1024:.0f} KB, energy "
            f"{d['energy_uj_before']:.1f} -> {d['energy_uj_after']:.1f} uJ")
