"""Graph passes. Each pass is one file; PASSES lists the exact passes run on every compile, in order."""
from .attention import FuseAttention
from .constant_fold import ConstantFolding
from .dce import DeadCodeElimination
from .fold_bn import FoldBatchNorm
from .manager import GraphPass, PassManager
from .records import PassRecord

PASSES: dict[str, type[GraphPass]] = {p.name: p for p in (DeadCodeElimination, ConstantFolding, FoldBatchNorm,
                                                           FuseAttention)}
DEFAULT_ORDER = ("dead_code", "constant_fold", "fold_batchnorm", "fuse_attention", "dead_code")


def default_pass_manager(disabled=()) -> PassManager:
    return PassManager([PASSES[name]() for name in DEFAULT_ORDER if name not in disabled])


__all__ = ["GraphPass", "PassManager", "PassRecord", "PASSES", "default_pass_manager"]
