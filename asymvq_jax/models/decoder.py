"""The SD decoder, optionally with the asymmetric masked-image branch."""

from flax import nnx

from asymvq_jax.models.blocks import Dtypes, MidBlock, UpBlock
from asymvq_jax.models.condition import MaskConditionEncoder, blend
from asymvq_jax.models.config import VAEConfig


class Decoder(nnx.Module):
    """latent -> image. With `config.asymmetric`, `__call__` also takes the image and mask."""

    def __init__(self, config: VAEConfig, dt: Dtypes, rngs: nnx.Rngs, remat: bool | str = False):
        widths, groups = config.up_block_out_channels[::-1], config.norm_num_groups  # low -> high res
        self.remat = remat
        self.conv_in = dt.conv(config.latent_channels, widths[0], 3, rngs)
        self.mid_block = MidBlock(widths[0], groups, dt, rngs)
        self.up_blocks = nnx.List([
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_up_block + 1, groups,
                    i < len(widths) - 1, dt, rngs)
            for i in range(len(widths))])
        self.condition_encoder = (
            MaskConditionEncoder(config.out_channels, widths[-1], widths[0], dt, rngs)
            if config.asymmetric else None)
        self.conv_norm_out = dt.group_norm(widths[-1], groups, rngs)
        self.conv_out = dt.conv(widths[-1], config.out_channels, 3, rngs)

    def features(self, z, image=None, mask=None):
        """Everything before conv_out: the adaptive GAN weight differentiates through conv_out alone."""
        return self.up(self.mid(z), image, mask)

    def mid(self, z):
        """conv_in and the mid block, at latent resolution (the one global attention)."""
        return self.mid_block(self.conv_in(z), self.remat)

    def up(self, h, image=None, mask=None):
        """The up levels from the mid block's output, with the blends, then the output norm and SiLU."""
        if image is None:
            for block in self.up_blocks:
                h = block(h, self.remat)
        else:
            # Branch features from H/8 up to H; the first blends after the mid block.
            conds = self.condition_encoder((1 - mask) * image)[::-1]
            for block, cond in zip(self.up_blocks, conds):
                h = block(blend(h, cond, mask), self.remat)
            h = blend(h, conds[-1], mask)
        return nnx.silu(self.conv_norm_out(h))

    def __call__(self, z, image=None, mask=None):
        return self.conv_out(self.features(z, image, mask))
