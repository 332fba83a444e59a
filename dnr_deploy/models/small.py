"""The embedded default's network: four 3x3 convs for 8x8 digit images."""

from torch import nn

from dnr_deploy.models.registry import register_model


def conv_bn_relu(in_chans: int, out_chans: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    ]


@register_model
def small(num_classes: int = 10, in_chans: int = 1, width: int = 1) -> nn.Module:
    """conv32-conv64-pool-conv128-conv128-global pool-linear (~240k weights), every hidden
    width times `width` (spec `small:K`; weights grow about K^2-fold), so the capacity
    benchmark can ask how compression costs robustness as the net outgrows its task.

    Global pooling before the single linear layer maps each last-conv channel to one classifier
    input, so channel pruning stays a plain index selection all the way to the logits.
    """
    c1, c2, c3 = 32 * width, 64 * width, 128 * width
    return nn.Sequential(
        *conv_bn_relu(in_chans, c1),
        *conv_bn_relu(c1, c2),
        nn.MaxPool2d(2),
        *conv_bn_relu(c2, c3),
        *conv_bn_relu(c3, c3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )
