"""AutoencoderKL: frozen encoder, quant convs (families that have them), diagonal Gaussian posterior,
(asymmetric) decoder."""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from asymvq_jax.models.blocks import LayerFactory
from asymvq_jax.models.config import VAEConfig
from asymvq_jax.models.decoder import Decoder
from asymvq_jax.models.encoder import Encoder


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior over latents, channels last."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self):
        """KL to N(0, 1), summed per example."""
        return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """NHWC, images in [-1, 1], masks [B, H, W, 1] with 1 = hole. Parameter paths follow diffusers' keys."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False, init: str = "torch"):
        make = LayerFactory(dtype, param_dtype, init)  # init: new layers' start (blocks.fresh_init)
        self.config = config
        self.encoder = Encoder(config, make, rngs, remat)
        self.quant_conv = (make.conv(2 * config.latent_channels, 2 * config.latent_channels, 1, rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (make.conv(config.latent_channels, config.latent_channels, 1, rngs)
                                if config.use_post_quant_conv else None)
        self.decoder = Decoder(config, make, rngs, remat)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.up_block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"encode expects [B, H, W, {self.config.in_channels}] images, got shape {x.shape}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z, image=None, mask=None):
        """Latent -> image. With image and mask, the known region (mask 0) is guided by the image."""
        image, mask = self._check_condition(z, image, mask)
        return self.decoder(self.post_quant(z), image, mask)

    def decoder_features(self, z, image=None, mask=None, gaps=None):
        """The decoder up to (not including) conv_out; see `Decoder.features` and `Decoder.up`'s gaps."""
        image, mask = self._check_condition(z, image, mask)
        return self.decoder.features(self.post_quant(z), image, mask, gaps)

    def post_quant(self, z):
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    @property
    def compute_dtype(self):
        return self.decoder.conv_in.dtype

    def __call__(self, x, mask=None, *, key=None):
        """Encode and decode x; samples the posterior when given a key, else takes its mode."""
        post = self.encode(x)
        z = post.mode() if key is None else post.sample(key)
        return self.decode(z, x if mask is not None else None, mask)

    def _check_condition(self, z, image, mask):
        """Validates shapes and broadcasts a batch-1 image/mask to the latent batch."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"decode expects latents [B, h, w, {self.config.latent_channels}], got shape {z.shape}")
        if image is None and mask is None:
            return None, None
        if image is None or mask is None:
            raise ValueError("decode needs both image and mask, or neither (plain decoding)")
        if not self.config.asymmetric:
            raise ValueError("this is a plain SD decoder: it has no masked-image branch; pass no image/mask")
        if mask.ndim == 3:
            mask = mask[..., None]
        size = (z.shape[1] * self.downscale, z.shape[2] * self.downscale)
        expected = {"image": (*size, self.config.out_channels), "mask": (*size, 1)}
        batch = z.shape[0]
        out = []
        for name, value in (("image", image), ("mask", mask)):
            if value.ndim != 4 or tuple(value.shape[1:]) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; for latents of shape {tuple(z.shape)} "
                                 f"it must be [B, {', '.join(map(str, expected[name]))}]")
            if value.shape[0] not in (1, batch):
                raise ValueError(f"{name} batch {value.shape[0]} matches neither the latent batch {batch} nor 1")
            out.append(jnp.broadcast_to(value, (batch, *value.shape[1:])))
        return out
