import pytest
import torch

import effopt
from effopt.options import KernelChoice, Options


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown effopt option\(s\) \['tokn_merge'\].*valid options: \[.*'target'"):
        Options.from_dict({"tokn_merge": 8})


@pytest.mark.parametrize("bad, match", [
    ({"kernel_choice": "fastest"}, r"kernel_choice='fastest' is invalid; valid: \['measure', 'tvm'\]"),
    ({"target": "llvm -mcpu=znver4"}, r"unknown target .*valid: host, llvm, cuda"),
    ({"target": {"mcpu": "znver4"}}, r"has no 'kind'"),
    ({"strict": "yes"}, r"'strict' must be True or False"),
    ({"disable_passes": ["constant_folding"]}, r"unknown pass\(es\) \['constant_folding'\].*'constant_fold'"),
    ({"cache_dir": 3}, r"cache_dir must be a path string"),
])
def test_invalid_values_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        Options.from_dict(bad)


def test_valid_options_parse():
    o = Options.from_dict({"target": {"kind": "llvm", "num-cores": 2}, "kernel_choice": "tvm", "strict": True,
                           "disable_passes": ["fold_batchnorm"]})
    assert o.kernel_choice is KernelChoice.TVM and o.strict and o.disable_passes == ("fold_batchnorm",)
    assert Options.from_dict({"target": '{"kind": "llvm"}'}).target == '{"kind": "llvm"}'


def test_bad_option_through_torch_compile_raises_value_error():
    f = torch.compile(torch.nn.Linear(2, 2), backend="effopt", options={"quantise": "int8"})
    with pytest.raises(Exception) as info:
        f(torch.randn(1, 2))
    assert "valid options" in str(info.value)


def test_backend_binds_options():
    be = effopt.backend(kernel_choice="tvm", cache=False)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    assert all(k.choice == "tvm" for k in effopt.last_report().lowering.kernels)
    with pytest.raises(ValueError):
        effopt.backend(bogus=1)


def test_every_option_is_parsed_by_its_type_and_takes_its_config_object():
    import dataclasses
    import typing

    import effopt
    from effopt.options import parser_of

    hints = typing.get_type_hints(effopt.Options)
    for f in dataclasses.fields(effopt.Options):
        assert callable(parser_of(f, hints[f.name]))  # a type without a parser would raise TypeError here
    assert hints["quantize"] == typing.Optional[effopt.QuantConfig]
    quant = effopt.QuantConfig.parse({"mode": "dynamic", "layers": "mlp"})
    o = effopt.Options.from_dict({"quantize": quant, "attention": effopt.AttentionConfig.parse("linear")})
    assert o.quantize is quant and o.attention.kind == "linear" and o.attention.feature_map == "elu"
