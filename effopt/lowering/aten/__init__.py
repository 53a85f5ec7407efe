"""The lowering rules of ATen ops, one file per op category (as TVM's relax/transform/legalize_ops/): a rule's
file says what it lowers. Importing this package registers them (rules.lowers); to_relax.Converter calls them."""
from . import attention, creation, elementwise, index, manipulate, nn, reduce  # noqa: F401
