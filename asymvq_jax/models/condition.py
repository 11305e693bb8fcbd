"""The asymmetric decoder's conditional branch and the mask-guided blend.

The branch encodes the masked image `(1 - m) * x` with five plain convs into features at
H, H, H/2, H/4 and H/8 (widths: `VAEConfig.branch_widths`). The blend replaces the known region
(m = 0) of a decoder feature map with the branch feature of the same size, so the decoder only has
to generate the hole.
"""

from flax import nnx

from asymvq_jax.models.blocks import LayerFactory


class MaskConditionEncoder(nnx.Module):
    """Two 3x3 stride-1 convs, then three 4x4 stride-2 convs, ReLU between them."""

    def __init__(self, in_channels: int, widths: list[int], make: LayerFactory, rngs: nnx.Rngs):
        ins = [in_channels] + widths[:-1]
        self.layers = nnx.List([
            make.conv(cin, cout, 3, rngs) if k < 2 else make.conv(cin, cout, 4, rngs, stride=2, padding=1)
            for k, (cin, cout) in enumerate(zip(ins, widths))])

    def __call__(self, masked_image):
        """Returns the pre-ReLU features from full resolution down to H/8."""
        features, x = [], masked_image
        for k, layer in enumerate(self.layers):
            if k:
                x = nnx.relu(x)
            x = layer(x)
            features.append(x)
        return features


def downsample_mask(mask, size: int):
    """Nearest downsampling that matches torch's: `interpolate(mode="nearest")` keeps pixel i*s."""
    stride = mask.shape[1] // size
    return mask[:, ::stride, ::stride]


def blend(h, feature, mask):
    """Mask-guided blend: keep h in the hole (mask 1), take the branch feature elsewhere."""
    m = downsample_mask(mask, h.shape[1]).astype(h.dtype)
    return h * m + feature.astype(h.dtype) * (1 - m)
