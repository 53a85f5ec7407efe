"""effopt's own operators, one module per family: the torch custom ops the passes introduce, each with its
plain-PyTorch reference and its fake, declared once (spec.py) for every stage to read. Importing the package
imports every module in it, which registers the ops: a new op file needs no edit elsewhere."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
