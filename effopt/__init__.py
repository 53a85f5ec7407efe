"""effopt: a torch.compile backend that lowers transformer graphs through Apache TVM."""
from .host import apply_torch_environment as _limit_torch

_limit_torch()  # EFFOPT_HOST_ISA=avx2: torch's own kernels limited too, where the caller did not set them
from .version import __version__  # noqa: E402

from .backend import backend, effopt_backend  # noqa: E402
from .options import (AttentionConfig, AutoConfig, KernelChoice, Options, QuantConfig, ShiftConfig,  # noqa: E402
                      TokenConfig)
from .inspect.report import last_report  # noqa: E402
from .ops.moe import moe_loss  # noqa: E402
from .passes.reparameterize import attention_parameters, reparameterize, shift_parameters  # noqa: E402
from .inspect.token_view import draw_token_merges, token_sources  # noqa: E402
from .inspect import explain  # noqa: E402
from . import autotune  # noqa: E402  (effopt.autotune(model, inputs, target=...) tunes)
from . import logs as _logs  # noqa: E402

_logs.configure()  # EFFOPT_LOG=passes,lowering,guard

__all__ = ["backend", "effopt_backend", "Options", "KernelChoice", "AttentionConfig", "TokenConfig", "ShiftConfig",
           "QuantConfig", "AutoConfig", "last_report", "reparameterize", "attention_parameters",
           "shift_parameters", "moe_loss",
           "token_sources", "draw_token_merges", "explain", "autotune", "__version__"]
