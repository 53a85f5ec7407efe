import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["EFFOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="effopt-test-cache-")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def compile_effopt(model, **options):
    options.setdefault("cache", False)
    return torch.compile(model, backend="effopt", options=options)


@pytest.fixture
def no_fallback_warnings():
    from effopt.lowering import EffoptFallbackWarning

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield w
    bad = [str(x.message) for x in w if issubclass(x.category, EffoptFallbackWarning)]
    assert not bad, f"unexpected fallbacks: {bad}"


# figures that reliability tests report (tests/fuzz), printed at the end of `make test`
FIGURES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "effopt reliability")
        for name, text in FIGURES.items():
            terminalreporter.write_line(f"{name}: {text}")


SLOW_DIRS = ("e2e", "fuzz", "autotune")  # whole models, random graphs, MetaSchedule: every test in them is slow


def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if os.path.relpath(str(item.fspath), root).split(os.sep)[0] in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)
