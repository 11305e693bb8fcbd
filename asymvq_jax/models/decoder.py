"""The SD decoder, optionally with the asymmetric masked-image branch."""

import dataclasses
from typing import Callable

from flax import nnx

from asymvq_jax.models.blocks import (LayerFactory, MidBlock, UpBlock, own_statistics, remat_policy,
                                     resnet_second_half)
from asymvq_jax.models.condition import MaskConditionEncoder, blend
from asymvq_jax.models.config import VAEConfig


class Decoder(nnx.Module):
    """latent -> image. With `config.asymmetric`, `__call__` also takes the image and mask."""

    def __init__(self, config: VAEConfig, make: LayerFactory, rngs: nnx.Rngs, remat: bool | str = False):
        widths, groups = config.up_block_out_channels[::-1], config.norm_num_groups  # low -> high res
        self.remat = remat
        self.conv_in = make.conv(config.latent_channels, widths[0], 3, rngs)
        self.mid_block = MidBlock(widths[0], groups, make, rngs)
        self.up_blocks = nnx.List([
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_up_block + 1, groups,
                    i < len(widths) - 1, make, rngs)
            for i in range(len(widths))])
        self.condition_encoder = (
            MaskConditionEncoder(config.out_channels, config.branch_widths(), make, rngs)
            if config.asymmetric else None)
        self.conv_norm_out = make.group_norm(widths[-1], groups, rngs)
        self.conv_out = make.conv(widths[-1], config.out_channels, 3, rngs)

    def features(self, z, image=None, mask=None, gaps=None):
        """Everything before conv_out: the adaptive GAN weight differentiates through conv_out alone."""
        return self.up(self.mid(z), image, mask, gaps)

    def mid(self, z):
        """conv_in and the mid block, at latent resolution (the one global attention)."""
        return self.mid_block(self.conv_in(z), self.remat)

    def branch_features(self, image, mask):
        """The masked image's branch features, low resolution first: level k is blended in by the segment
        whose `level` is k. A decoder of fewer than 4 levels leaves the coarsest unused, as diffusers'."""
        features = self.condition_encoder((1 - mask) * image)[::-1]
        return features[len(features) - len(self.up_blocks) - 1:]

    def up(self, h, image=None, mask=None, gaps=None):
        """The up levels from the mid block's output, with the blends, then the output norm and SiLU.
        A list `gaps` receives, at each blend, the decoder's own features there and the branch feature
        that replaces them in the known region (for a training loss on their difference)."""
        conds = None if image is None else self.branch_features(image, mask)
        for segment in self.segments():
            if gaps is not None and conds is not None and segment.level is not None:
                own = segment(h, None, mask, remat=self.remat)  # the same segment, blending nothing
                gaps.append((own, conds[segment.level]))
                h = blend(own, conds[segment.level], mask)
            else:
                h = segment(h, conds, mask, remat=self.remat)
        return h

    def segments(self) -> list["Segment"]:
        """The up path cut at its GroupNorms. Each segment but the first starts at a GroupNorm and runs
        to the next one's input, so a tiled decode (`inference.decode_tiled`) can give every norm the
        whole image's statistics between segments. The branch features blend in after the mid block
        and at the end of each up level."""
        segments = [Segment(_blend_mid, (), level=0)]
        for i, block in enumerate(self.up_blocks):
            for j, resnet in enumerate(block.resnets):
                last = j + 1 == len(block.resnets)
                segments.append(Segment(_first_half, (resnet,)))
                upsamplers = tuple(block.upsamplers) if last else ()
                segments.append(Segment(_second_half, (resnet.norm2, resnet.conv2, upsamplers),
                                        level=i + 1 if last else None))
        return segments + [Segment(_norm_out, (self.conv_norm_out,))]

    def __call__(self, z, image=None, mask=None):
        return self.conv_out(self.features(z, image, mask))


@dataclasses.dataclass(frozen=True)
class Segment:
    """`run(modules, carry, normalize, cond, mask)`: a module-level function, one per kind of segment.
    A segment's program is thus named by its kind and its modules' structure, not by its place:
    jit compiles the ResNet halves of one width and resolution once. The carry is an array or a tuple
    whose last array is the next GroupNorm's input; `cond` is the branch feature at `level` (None on a
    plain decode, or where the segment blends nothing)."""
    run: Callable
    modules: tuple
    level: int | None = None

    def __call__(self, carry, conds=None, mask=None, normalize=own_statistics, remat: bool | str = False):
        cond = None if conds is None or self.level is None else conds[self.level]
        if not remat:
            return self.run(self.modules, carry, normalize, cond, mask)
        return nnx.remat(lambda modules, c: self.run(modules, c, normalize, cond, mask),
                         policy=remat_policy(remat))(self.modules, carry)


def _blend_mid(modules, h, normalize, cond, mask):
    return h if cond is None else blend(h, cond, mask)


def _first_half(modules, x, normalize, cond, mask):
    (resnet,) = modules
    return resnet.first_half(x, normalize)


def _second_half(modules, carry, normalize, cond, mask):
    """The ResNet's second half; at the end of an up level, its upsampling and blend too."""
    norm, conv, upsamplers = modules
    x = resnet_second_half(norm, conv, carry, normalize)
    for up in upsamplers:
        x = up(x)
    return x if cond is None else blend(x, cond, mask)


def _norm_out(modules, h, normalize, cond, mask):
    (norm,) = modules
    return nnx.silu(normalize(norm, h))
