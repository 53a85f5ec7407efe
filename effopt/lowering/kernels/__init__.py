"""Hand-written, pre-scheduled TVM kernels for effopt's own operators (effopt/ops.py)."""
