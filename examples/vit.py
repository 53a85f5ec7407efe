"""A ViT-S/16 (random weights) as an effopt model file: `effopt inspect examples/vit.py --html report.html`.

Model files define effopt_model() -> (model, example_inputs) and, for options that need calibration data,
effopt_calibration() -> [inputs, ...].
"""
import torch

from effopt.testing.models import vit_small


def effopt_model():
    torch.manual_seed(0)
    return vit_small().eval(), (torch.randn(1, 3, 224, 224),)


def effopt_calibration():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(1, 3, 224, 224, generator=g),) for _ in range(2)]


if __name__ == "__main__":
    import effopt

    model, inputs = effopt_model()
    print(effopt.explain(model, inputs))
