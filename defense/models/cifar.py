"""32x32 architectures common in the backdoor literature (CIFAR-10, GTSRB)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops.misc import Conv2dNormActivation

from defense.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, one stage per entry of ``widths``."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: tuple[int, ...], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model
def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """The paper's CIFAR ResNet-18 (11 M parameters): 64-128-256-512, two blocks per stage."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes)


@register_model
def cifar_resnet_compact(num_classes: int = 10) -> nn.Module:
    """A 0.18 M-parameter ResNet (16-32-64, two blocks per stage) that trains on a laptop CPU."""
    return CifarResNet((16, 32, 64), (2, 2, 2), num_classes)


class LeNetDropout(nn.Module):
    """A LeNet-style CNN without BatchNorm, with dropout (as in many published backdoor models)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(128 * 4 * 4, 256), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def cifar_lenet(num_classes: int = 10) -> nn.Module:
    """LeNet-style 32x32 CNN, no BatchNorm, dropout 0.5."""
    return LeNetDropout(num_classes)


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``layout`` lists conv widths, ``"M"`` a 2x2 max-pool."""

    def __init__(self, layout: tuple, num_classes: int):
        super().__init__()
        layers, in_channels = [], 3
        for entry in layout:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(in_channels, entry, 3, padding=1, bias=False), nn.BatchNorm2d(entry), nn.ReLU()]
            in_channels = entry
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register_model
def cifar_vgg11_bn(num_classes: int = 10) -> nn.Module:
    """VGG-11 with BatchNorm for 32x32 inputs (9 M parameters), the CIFAR VGG of the backdoor literature."""
    return CifarVGG((64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"), num_classes)


@register_model
def cifar_vgg11_bn_compact(num_classes: int = 10) -> nn.Module:
    """cifar_vgg11_bn at a quarter of the width (0.6 M parameters): trains on a laptop CPU."""
    return CifarVGG((16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"), num_classes)


def _cifar_mobilenet_v2(num_classes: int, width_mult: float, second_stage_stride: int) -> nn.Module:
    """torchvision's MobileNetV2 (inverted residuals, depthwise convolutions, ReLU6) for 32x32 inputs:
    the stem keeps the resolution, as in the CIFAR MobileNetV2 of the backdoor literature."""
    # (expansion, output channels, blocks, stride) per stage: torchvision's ImageNet layout except
    # the second stage's stride, which the CIFAR literature sets to 1.
    stages = [[1, 16, 1, 1], [6, 24, 2, second_stage_stride], [6, 32, 3, 2], [6, 64, 4, 2],
              [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=width_mult,
                                           inverted_residual_setting=stages)
    stem_width = model.features[0][0].out_channels
    model.features[0] = Conv2dNormActivation(3, stem_width, stride=1, norm_layer=nn.BatchNorm2d,
                                             activation_layer=nn.ReLU6)
    return model


@register_model
def cifar_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 for 32x32 inputs (2.2 M parameters): stem and second stage at stride 1, 4x4 at the end."""
    return _cifar_mobilenet_v2(num_classes, width_mult=1.0, second_stage_stride=1)


@register_model
def cifar_mobilenet_v2_compact(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 at half width with the second stage at stride 2 (0.7 M parameters, 2x2 at the end):
    about the compact ResNet's training cost on a laptop CPU."""
    return _cifar_mobilenet_v2(num_classes, width_mult=0.5, second_stage_stride=2)


@register_model
def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A very small CNN for any input size (global pooling): the demo and the tests use it."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )
