"""Hand-written, pre-scheduled TVM kernels for effopt's own operators (effopt/ops/), one file per op family,
each with the lowering rule (`@lowers`, lowering/rules.py) of its ops. Importing the package imports every
kernel file, which registers their rules: a new kernel file needs no edit elsewhere."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
