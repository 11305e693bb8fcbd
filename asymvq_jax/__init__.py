"""asymvq-jax: the asymmetric Stable Diffusion autoencoder (arXiv 2306.04632) in JAX / Flax NNX.

    import asymvq_jax
    vae = asymvq_jax.load(path)                     # diffusers folder, LDM / SD / Asymmetric_VQGAN file, ours,
                                                    # a train.py workdir or run of stages; local or gs://
    z = vae.encode(x).mode()                        # x: [B, H, W, 3] in [-1, 1]
    y = vae.decode(z, image=x, mask=m)              # m: [B, H, W, 1], 1 = hole to generate
    asymvq_jax.save_pretrained(vae, "out", format="diffusers")   # or "ldm", "asymvq"
"""

from asymvq_jax.checkpoint import load
from asymvq_jax.convert import from_pretrained, save_pretrained
from asymvq_jax.models import PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig, preset

__all__ = ["AutoencoderKL", "DiagonalGaussian", "PRESETS", "VAEConfig", "from_pretrained", "load",
           "preset", "save_pretrained"]
