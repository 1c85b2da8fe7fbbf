"""``badexpert models``: the architectures known by name."""

from __future__ import annotations


def add_parser(commands) -> None:
    models = commands.add_parser("models", help="list the architectures known by name")
    models.set_defaults(handler=run_models)


def run_models(args) -> int:
    from defense.models import registered_models

    print("architectures of this package:", ", ".join(registered_models()))
    print("also any torchvision.models builder (resnet18, vgg16_bn, mobilenet_v2, vit_b_16, ...),")
    print("a 'package.module:factory' on PYTHONPATH, a TorchScript file, or a torch.export .pt2 file")
    return 0
