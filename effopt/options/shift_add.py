"""The `shift_add` option: power-of-two weights on linear layers (effopt/passes/shift_add.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .common import check_parameters

LAYERS = ("mlp", "all")
TERMS = (1, 2, 3)  # powers of two per weight
ACT_BITS = (0, 4, 8)  # 0: the float path; 4 or 8: MatShift's integer path with activations of that many bits


@dataclass(frozen=True)
class ShiftConfig:
    layers: str = "mlp"
    """'mlp' (the MLP linears) or 'all' (every frozen linear)."""
    terms: int | str = 1
    """powers of two per weight: 1, 2 or 3; 'auto': per layer, the fewest (from 1) that hold the budget."""
    activation_bits: int = 0
    """0: the float path; 8 or 4: the integer (MatShift) path with activations quantized per token."""

    @classmethod
    def parse(cls, value) -> "ShiftConfig":
        if isinstance(value, ShiftConfig):
            return value
        if value == "moe":
            raise ValueError("shift_add='moe' is a trained mixture of experts: build it with "
                             "effopt.reparameterize(model, example_inputs, shift_add='moe'), fine-tune it, then "
                             "torch.compile it with backend='effopt'")
        given = value
        if isinstance(value, str):
            value = {"layers": value}
        if not isinstance(value, dict) or value.get("layers", "mlp") not in LAYERS:
            raise ValueError(f"shift_add={given!r} is invalid; valid: {list(LAYERS)} or a dict {{'layers': "
                             "'mlp'|'all', 'terms': 1|2|3|'auto', 'activation_bits': 0|4|8}")
        check_parameters("shift_add", value, ("layers", "terms", "activation_bits"))
        cfg = cls(**value)
        if cfg.terms not in TERMS and cfg.terms != "auto":
            raise ValueError(f"shift_add terms={cfg.terms!r}; valid: {list(TERMS)} or 'auto' (per layer)")
        if cfg.activation_bits not in ACT_BITS:
            raise ValueError(f"shift_add activation_bits={cfg.activation_bits!r}; valid: {list(ACT_BITS)} "
                             "(0: float path)")
        return cfg

    def __str__(self) -> str:
        return f"{self.layers}(terms={self.terms}, activation_bits={self.activation_bits})"

    @property
    def first_terms(self) -> int:
        """The terms every layer starts with (with 'auto', a layer over budget is retried with more)."""
        return min(TERMS) if self.terms == "auto" else self.terms
