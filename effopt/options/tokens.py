"""The `token_merge` (ToMe) and `token_prune` (EViT) options (effopt/passes/token_reduction.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .common import check_parameters


@dataclass(frozen=True)
class TokenConfig:
    method: str  # "merge" | "prune"
    r: tuple | int = 0
    """merge: tokens merged per block: an int (the same in every block), a per-block list, or with
    `inflect` a schedule (ToMe's parse_r: inflect -0.5 merges 1.5r in the first block down to 0.5r in
    the last, the same total as a constant r)."""
    inflect: float = 0.0
    keep_rate: float = 1.0
    """prune: the fraction of (non-CLS) tokens each pruning layer keeps."""
    layers: tuple | None = None
    """prune: the blocks after whose attention tokens are pruned; default the 4th, 7th and 10th of 12
    (EViT's choice for DeiT-S), scaled to the model's depth."""
    proportional: bool = True
    """merge: proportional attention (log(size) added to the attention logits)."""
    protected: int = 1
    """leading tokens never merged or pruned (CLS; 2 with a distillation token)."""

    MERGE_KEYS = ("r", "inflect", "proportional", "protected")
    PRUNE_KEYS = ("keep_rate", "layers", "protected")

    @classmethod
    def parse_merge(cls, value) -> "TokenConfig":
        value = _as_dict("token_merge", value, (int, list, tuple), cls.MERGE_KEYS,
                         "an int r >= 0 (tokens merged per block), a per-block list of ints")
        r = value["r"]
        if isinstance(r, (list, tuple)):
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r):
                raise ValueError(f"token_merge r list must hold ints >= 0, got {r!r}")
            r = tuple(r)
        elif isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"token_merge r must be an int >= 0 or a list of them, got {r!r}")
        inflect = value.get("inflect", 0.0)
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1 <= inflect <= 1:
            raise ValueError(f"token_merge inflect must be a number in [-1, 1] (e.g. -0.5: decreasing), got "
                             f"{inflect!r}")
        return cls("merge", r=r, inflect=float(inflect), proportional=_bool(value, "proportional", True),
                   protected=_protected(value))

    @classmethod
    def parse_prune(cls, value) -> "TokenConfig":
        value = _as_dict("token_prune", value, (int, float), cls.PRUNE_KEYS, "a keep rate in (0, 1] (e.g. 0.7)")
        rate = value["keep_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"token_prune keep_rate must be in (0, 1], got {rate!r}")
        layers = value.get("layers")
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(f"token_prune layers must be a list of block indices >= 0, got {layers!r}")
            layers = tuple(sorted(set(layers)))
        return cls("prune", keep_rate=float(rate), layers=layers, protected=_protected(value))

    def schedule(self, num_blocks: int) -> list[int]:
        """merge: r per block (ToMe's parse_r); prune: 1 at the pruning blocks, else 0."""
        if self.method == "prune":
            layers = self.layers if self.layers is not None else default_prune_layers(num_blocks)
            return [1 if i in layers else 0 for i in range(num_blocks)]
        if isinstance(self.r, tuple):
            return (list(self.r) + [0] * num_blocks)[:num_blocks]
        lo = int(self.r * (1.0 - self.inflect))
        hi = 2 * self.r - lo
        step = (hi - lo) / max(1, num_blocks - 1)
        return [int(lo + step * i) for i in range(num_blocks)]

    def scaled(self, factor: float) -> "TokenConfig":
        """A milder setting for the accuracy guard's back-off: r times factor, or keep rate moved toward 1."""
        if self.method == "prune":
            return replace(self, keep_rate=1.0 - (1.0 - self.keep_rate) * factor)
        if isinstance(self.r, tuple):
            return replace(self, r=tuple(int(x * factor) for x in self.r))
        return replace(self, r=int(self.r * factor))

    def __str__(self) -> str:
        if self.method == "prune":
            return f"token_prune(keep_rate={self.keep_rate:g}" + (f", layers={list(self.layers)}" if self.layers
                                                                  else "") + ")"
        r = list(self.r) if isinstance(self.r, tuple) else self.r
        return f"token_merge(r={r}" + (f", inflect={self.inflect:g}" if self.inflect else "") + \
            ("" if self.proportional else ", proportional=False") + ")"


def _as_dict(option: str, value, short_types: tuple, keys: tuple, short: str) -> dict:
    """The option as a dict of parameters: its short form (e.g. `token_merge=8`) is the first key."""
    given = value
    if isinstance(value, short_types) and not isinstance(value, bool):
        value = {keys[0]: value}
    if not isinstance(value, dict) or keys[0] not in value:
        raise ValueError(f"{option}={given!r} is invalid; valid: {short}, or a dict with keys {list(keys)}")
    check_parameters(option, value, keys)
    return value


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be True or False, got {v!r}")
    return v


def _protected(d: dict) -> int:
    p = d.get("protected", 1)
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"protected must be an int >= 0 (leading tokens never reduced: 1 = CLS), got {p!r}")
    return p


def default_prune_layers(num_blocks: int) -> tuple[int, ...]:
    """EViT prunes after blocks 4, 7 and 10 of DeiT-S's 12 (indices 3, 6, 9); the same fractions of depth."""
    return tuple(sorted({min(num_blocks - 1, round(num_blocks * f)) for f in (0.25, 0.5, 0.75)}))
