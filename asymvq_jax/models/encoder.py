"""The SD KL-f8 encoder: image -> 2 x latent channels (mean and log-variance)."""

from flax import nnx

from asymvq_jax.models.blocks import DownBlock, LayerFactory, MidBlock
from asymvq_jax.models.config import VAEConfig


class Encoder(nnx.Module):

    def __init__(self, config: VAEConfig, make: LayerFactory, rngs: nnx.Rngs, remat: bool | str = False):
        widths, groups = config.down_block_out_channels, config.norm_num_groups
        self.remat = remat
        self.conv_in = make.conv(config.in_channels, widths[0], 3, rngs)
        self.down_blocks = nnx.List([
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_down_block, groups,
                      i < len(widths) - 1, make, rngs)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups, make, rngs)
        self.conv_norm_out = make.group_norm(widths[-1], groups, rngs)
        self.conv_out = make.conv(widths[-1], 2 * config.latent_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h, self.remat)
        h = self.mid_block(h, self.remat)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))
