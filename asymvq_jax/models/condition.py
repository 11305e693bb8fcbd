"""The asymmetric decoder's conditional branch and the mask-guided blend.

The branch encodes the masked image `(1 - m) * x` with five plain convs into features at
H, H, H/2, H/4 and H/8. The blend replaces the known region (m = 0) of a decoder feature map
with the branch feature of the same size, so the decoder only has to generate the hole.
"""

import jax.numpy as jnp
from flax import nnx

from asymvq_jax.models.blocks import Dtypes, conv_with


def branch_widths(first: int, last: int) -> list[int]:
    """Output widths of the five branch convs: doubling from `first`, capped at `last`."""
    return [min(first * 2**k, last) for k in range(4)] + [last]


class MaskConditionEncoder(nnx.Module):
    """Two 3x3 stride-1 convs, then three 4x4 stride-2 convs, ReLU between them."""

    def __init__(self, in_channels: int, first: int, last: int, dt: Dtypes, rngs: nnx.Rngs):
        widths = branch_widths(first, last)
        ins = [in_channels] + widths[:-1]
        self.layers = nnx.List([
            dt.conv(cin, cout, 3, rngs) if k < 2 else dt.conv(cin, cout, 4, rngs, stride=2, padding=1)
            for k, (cin, cout) in enumerate(zip(ins, widths))])

    def __call__(self, masked_image):
        """Returns the pre-ReLU features from full resolution down to H/8."""
        features, x = [], masked_image
        for k, layer in enumerate(self.layers):
            if k:
                x = nnx.relu(x)
            x = layer(x) if k < 2 else strided_conv(layer, x)
            features.append(x)
        return features


def strided_conv(conv: nnx.Conv, x):
    """The 4x4 stride-2 pad-1 conv as a 2x2 stride-1 conv over 2x2 pixel blocks stacked as channels:
    the same multiplies, in the form CPU convolution kernels run fastest."""
    c = x.shape[-1]
    blocks = _space_to_depth(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    k = conv.kernel[...]  # [4, 4, c, o] -> [2, 2, (2, 2, c), o], matching the block layout
    kernel = k.reshape(2, 2, 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, -1)
    return conv_with(conv, blocks, kernel, "VALID")


def _space_to_depth(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)


def downsample_mask(mask, size: int):
    """Nearest downsampling that matches torch's: `interpolate(mode="nearest")` keeps pixel i*s."""
    stride = mask.shape[1] // size
    return mask[:, ::stride, ::stride]


def blend(h, feature, mask):
    """Mask-guided blend: keep h in the hole (mask 1), take the branch feature elsewhere."""
    m = downsample_mask(mask, h.shape[1]).astype(h.dtype)
    return h * m + feature.astype(h.dtype) * (1 - m)
