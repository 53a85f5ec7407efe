"""The partitioner cuts convex regions: contracting a region into one call never creates a cycle, even
when a node could reach its input's region again through an op that stays outside (here a GEMM)."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from effopt.lowering.partition import partition
from effopt.testing.compare import assert_same_as_eager
from tests.conftest import compile_effopt


def _diamond(x, w):
    a = torch.relu(x)
    b = torch.mm(a, w)  # runs on the library kernel, outside every TVM region
    return torch.sigmoid(a + b), torch.tanh(a)


def _reaches(src, dst_set, members):
    """Whether `src` reaches a node of `dst_set` through at least one node outside `members`."""
    stack, seen = [(u, u not in members) for u in src.users], set()
    while stack:
        n, left = stack.pop()
        if (n, left) in seen:
            continue
        seen.add((n, left))
        if left and n in dst_set:
            return True
        stack.extend((u, left or u not in members) for u in n.users)
    return False


def test_regions_are_convex():
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm = make_fx(_diamond, tracing_mode="fake")(x, w)
    regions = partition(gm)
    assert regions
    for r in regions:
        members = set(r.nodes)
        assert not any(_reaches(n, members, members) for n in r.nodes)
    # relu and the add that reads relu's output again through mm cannot share a region
    where = {n.target.__name__.split(".")[0]: i for i, r in enumerate(regions) for n in r.nodes}
    assert where["relu"] != where["add"]


def test_diamond_compiles_and_matches_eager():
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    f = compile_effopt(_diamond, kernel_choice="tvm")
    with torch.no_grad():
        assert_same_as_eager(f(x, w), _diamond(x, w))
