"""Networks for 2-D imaging tasks, all with GroupNorm (never BatchNorm).

BatchNorm mixes samples of a batch, which breaks per-sample gradients and so
DP-SGD; GroupNorm normalises each sample alone and keeps Opacus applicable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from fedhealth.catalogue import MODELS

if TYPE_CHECKING:  # torch is imported when a model is built, not to validate a config
    from torch import nn


class GroupNormOptions(BaseModel):
    """Options of the MONAI networks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: int = Field(8, ge=1, description="GroupNorm groups (DP-safe; no BatchNorm).")


class SmallCNNOptions(GroupNormOptions):
    """Options of ``small_cnn``."""

    channels: list[int] = Field(
        default_factory=lambda: [16, 32], description="Output channels of each stage."
    )


def _groups(channels: int, groups: int) -> int:
    # GroupNorm needs groups | channels; fall back to the largest divisor <= groups.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


@MODELS.register("small_cnn", traits={"image"}, options=SmallCNNOptions)
def small_cnn(
    in_channels: int, num_classes: int, channels: list[int], groups: int = 8
) -> nn.Module:
    """A small convolutional network: [conv3x3 -> GroupNorm -> ReLU -> maxpool] per stage.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for grey-scale).
    num_classes : int
        Number of classes.
    channels : list of int
        Output channels of each stage.
    groups : int
        GroupNorm groups per stage.
    """
    from torch import nn

    layers: list[nn.Module] = []
    width = in_channels
    for c in channels:
        layers += [
            nn.Conv2d(width, c, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(c, groups), c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


@MODELS.register("densenet121", traits={"image"}, options=GroupNormOptions)
def densenet121(in_channels: int, num_classes: int, groups: int = 8) -> nn.Module:
    """MONAI's 2-D DenseNet121 with GroupNorm (about 7 M parameters)."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        norm=("group", {"num_groups": groups}),
    )


@MODELS.register("resnet18", traits={"image"}, options=GroupNormOptions)
def resnet18(in_channels: int, num_classes: int, groups: int = 8) -> nn.Module:
    """MONAI's 2-D ResNet-18 with GroupNorm."""
    from monai.networks.nets import resnet18 as monai_resnet18

    model = monai_resnet18(
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=num_classes,
        norm=("group", {"num_groups": groups}),
    )
    # MONAI 1.6 does not pass `norm` down to every residual block: swap what is left.
    return batchnorm_to_groupnorm(model, groups)


def batchnorm_to_groupnorm(module: nn.Module, groups: int = 8) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (in place) by a GroupNorm layer."""
    from torch import nn

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(_groups(c, groups), c))
        else:
            batchnorm_to_groupnorm(child, groups)
    return module
