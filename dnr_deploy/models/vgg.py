"""VGG16 with batch norm, CIFAR variant (one linear classifier), as in the DNR paper."""

from torch import nn

from dnr_deploy.models.registry import register_model
from dnr_deploy.models.small import conv_bn_relu

# Output channels per conv; "M" is a 2x2 max pool.
VGG16_LAYOUT: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


@register_model
def vgg16(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """13 convs + 1 linear (~14.7M weights). The adaptive pool makes 64x64 Tiny-ImageNet inputs
    end at the same 512-wide vector as 32x32 CIFAR ones."""
    layers: list[nn.Module] = []
    chans = in_chans
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += conv_bn_relu(chans, int(entry))
            chans = int(entry)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans, num_classes)]
    return nn.Sequential(*layers)
