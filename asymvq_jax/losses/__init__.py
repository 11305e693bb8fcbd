"""Training losses: LPIPS-VGG16 (frozen), the PatchGAN discriminator, the hinge / NLL / KL terms
and the adaptive GAN weight of the authors' recipe. `lpips_weights` builds LPIPS's weight file."""

from asymvq_jax.losses.discriminator import NLayerDiscriminator, TorchBatchNorm
from asymvq_jax.losses.gan import (
    DISC_START,
    DISC_WEIGHT,
    KL_WEIGHT,
    PERCEPTUAL_WEIGHT,
    adaptive_weight_from_grads,
    disc_factor,
    generator_loss,
    generator_total_loss,
    grouped_head_grads,
    hinge_d_loss,
    reconstruction_nll,
)
from asymvq_jax.losses.lpips import (
    LPIPS,
    LPIPSWeight,
    LPIPSWeightsError,
    default_weights_path,
)

__all__ = [
    "LPIPS", "LPIPSWeight", "LPIPSWeightsError", "default_weights_path",
    "NLayerDiscriminator", "TorchBatchNorm",
    "DISC_START", "DISC_WEIGHT", "KL_WEIGHT", "PERCEPTUAL_WEIGHT",
    "adaptive_weight_from_grads", "disc_factor",
    "generator_loss", "generator_total_loss", "hinge_d_loss",
    "reconstruction_nll", "grouped_head_grads",
]
