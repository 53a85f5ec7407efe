"""The `quantize` option: int8 post-training quantization of linear layers (effopt/passes/quantize.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .common import check_parameters

MODES = ("static", "dynamic", "mixed")
# how per-token (dynamic) activations are quantized: 'int8' symmetric, 'uint7' asymmetric with a zero point per
# token (one AVX2 instruction per 4 bytes instead of three); 'auto' picks uint7 where the target's best integer
# dot product is AVX2's vpmaddubsw, int8 elsewhere
ACTIVATIONS = ("auto", "int8", "uint7")
_ALIASES = {"int8": "static", "int8-dynamic": "dynamic"}


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "dynamic"
    """'dynamic' (per-token activation scales), 'static' (calibrated per-tensor scales), or 'mixed' (static
    per layer where it holds the budget, dynamic where it does not)."""
    layers: str = "all"
    """'all' or 'mlp'."""
    fuse: bool = True
    """Quantize, GEMM, dequantize, bias and the following activation / residual add as one kernel."""
    smooth: float | None = None
    """SmoothQuant's migration strength alpha in (0, 1), for the layers whose plain int8 exceeds the
    accuracy budget (None: off). Needs calibration data."""
    activations: str = "auto"
    """Per-token activations: 'int8' (symmetric, 8 bits), 'uint7' (each token's own range [min, max] with
    a zero point, 7 bits: AVX2's vpmaddubsw takes them without the sign trick 8 bits need, about 1.3x
    faster GEMMs there), or 'auto' (uint7 on a target whose best integer dot product is AVX2, int8 on
    AVX-512 VNNI, AVX-VNNI and NEON). Static (calibrated) scales stay symmetric int8."""

    @classmethod
    def parse(cls, value) -> "QuantConfig":
        if isinstance(value, QuantConfig):
            return value
        given = value
        if isinstance(value, str):
            value = {"mode": _ALIASES.get(value, value)} if value in _ALIASES else None
        if not isinstance(value, dict):
            raise ValueError(f"quantize={given!r} is invalid; valid: {list(_ALIASES)} or a dict {{'mode': "
                             "'static'|'dynamic'|'mixed', 'layers': 'all'|'mlp'}")
        check_parameters("quantize", value, ("mode", "layers", "fuse", "smooth", "activations"))
        cfg = cls(**value)
        if cfg.mode not in MODES:
            raise ValueError(f"quantize mode={cfg.mode!r}; valid: {list(MODES)}")
        if cfg.layers not in ("all", "mlp"):
            raise ValueError(f"quantize layers={cfg.layers!r}; valid: ['all', 'mlp']")
        if not isinstance(cfg.fuse, bool):
            raise ValueError(f"quantize fuse={cfg.fuse!r}; valid: [True, False]")
        if cfg.smooth is not None and not (isinstance(cfg.smooth, (int, float)) and 0 < cfg.smooth < 1):
            raise ValueError(f"quantize smooth={cfg.smooth!r}; valid: None or a migration strength alpha in (0, 1), "
                             "such as 0.5")
        if cfg.activations not in ACTIVATIONS:
            raise ValueError(f"quantize activations={cfg.activations!r}; valid: {list(ACTIVATIONS)}")
        if cfg.smooth is not None and not cfg.fuse:
            raise ValueError("quantize smooth needs fuse=True (the fused kernel applies the smoothing)")
        return cfg

    def for_dot_product(self, dot: str | None) -> "QuantConfig":
        """This config with activations='auto' settled for a target whose best integer dot product is `dot`
        (effopt.target.int8_dot_product)."""
        if self.activations != "auto":
            return self
        return replace(self, activations="uint7" if dot == "avx2" else "int8")

    def __str__(self) -> str:
        return (f"int8({self.mode}, {self.layers}{'' if self.fuse else ', unfused'}"
                f"{'' if self.smooth is None else f', smooth {self.smooth:g}'}"
                f"{'' if self.activations == 'auto' else f', {self.activations} activations'})")
