"""Graph passes. Each pass is one file; PASSES lists the exact passes run on every compile, in order, and
GUARDED_ORDER names the approximate ones, which `approximate_passes` builds from the options into one pipeline
(tokens -> attention -> shift/add -> quantize; effopt/passes/guarded.py says why that order)."""
from ..options import PASS_NAMES
from .attention import FuseAttention
from .constant_fold import ConstantFolding
from .dce import DeadCodeElimination
from .fold_bn import FoldBatchNorm
from .guarded import GuardContext, GuardedPass
from .manager import GraphPass, PassManager
from .records import PassRecord

PASSES: dict[str, type[GraphPass]] = {p.name: p for p in (DeadCodeElimination, ConstantFolding, FoldBatchNorm,
                                                           FuseAttention)}
DEFAULT_ORDER = ("dead_code", "constant_fold", "fold_batchnorm", "fuse_attention", "dead_code")
# the approximate passes, by the name disable_passes takes, in the pipeline's order
GUARDED_ORDER = ("tokens", "attention", "shift_add", "quantize")


def pass_names() -> list[str]:
    """Every name disable_passes accepts."""
    return sorted(set(PASSES) | set(GUARDED_ORDER))


PASS_NAMES.update(pass_names())  # what the options' parser checks disable_passes against


def default_pass_manager(disabled=()) -> PassManager:
    return PassManager([PASSES[name]() for name in DEFAULT_ORDER if name not in disabled])


def approximate_passes(options, ctx: GuardContext, trained_shift: bool = False) -> list[GuardedPass]:
    """The guarded passes the options ask for, in the pipeline's order, less those in disable_passes.
    `trained_shift`: the graph has layers trained by effopt.reparameterize for shift weights (the shift
    pass converts them even without the shift_add option)."""
    from .approximate import AttentionPass
    from .quantize import QuantizePass
    from .shift_add import ShiftAddPass
    from .token_reduction import TokenReductionPass
    from ..target import int8_dot_product

    wanted = {"tokens": options.tokens is not None and TokenReductionPass(options.tokens, ctx),
              "attention": str(options.attention) != "exact" and AttentionPass(options.attention, ctx),
              "shift_add": (options.shift_add is not None or trained_shift) and ShiftAddPass(options.shift_add, ctx),
              "quantize": options.quantize is not None and QuantizePass(
                  options.quantize.for_dot_product(int8_dot_product(options.target)), ctx)}
    return [wanted[n] for n in GUARDED_ORDER if wanted[n] and n not in options.disable_passes]


__all__ = ["GraphPass", "GuardContext", "GuardedPass", "PassManager", "PassRecord", "PASSES", "GUARDED_ORDER",
           "approximate_passes", "default_pass_manager", "pass_names"]
