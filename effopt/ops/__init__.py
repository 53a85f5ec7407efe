"""effopt's own operators, one module per family: the torch custom ops the passes introduce, each with its
plain-PyTorch reference and its fake (effopt/ops/spec.py declares what every stage reads of them)."""
from . import attention, int8, moe, sdpa, shift, tokens  # noqa: F401  (importing registers the custom ops)

__all__ = ["attention", "int8", "moe", "sdpa", "shift", "tokens"]
