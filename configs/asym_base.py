"""Asymmetric base decoder (SD widths + branch) from a VAE's decoder: pretrained part at 0.1x lr.

Any family: the encoder, latent channels and factors come from init_from, e.g. FLUX's VAE
(`configs/asym_base.py:/path/FLUX.1-dev/vae`, or its ae.safetensors with `--config.init_family=flux`)
gives a base asymmetric decoder on 16-channel FLUX latents, starting from FLUX's decoder.
"""

from asymvq_jax.train.config import AUTHORS_IMAGENET_SUBSET, default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-base"
    c.init_from = arg or ""  # e.g. --config=configs/asym_base.py:/path/to/sd-vae (diffusers folder or file)
    c.loss.gan_group_size = 10  # one GPU's images: the adaptive weight and disc statistics per GPU
    c.data.num_images = AUTHORS_IMAGENET_SUBSET  # the horizon counts the authors' 12 epochs of it
    return c
