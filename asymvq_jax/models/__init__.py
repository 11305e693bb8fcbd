"""Flax NNX modules of the (asymmetric) SD autoencoder."""

from asymvq_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from asymvq_jax.models.condition import MaskConditionEncoder, blend
from asymvq_jax.models.config import FAMILIES, PRESETS, VAEConfig, family, preset
from asymvq_jax.models.decoder import Decoder
from asymvq_jax.models.encoder import Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussian", "Decoder", "Encoder", "MaskConditionEncoder", "PRESETS",
           "VAEConfig", "blend", "preset"]
