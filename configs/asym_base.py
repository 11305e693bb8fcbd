"""Asymmetric base decoder (SD widths + branch) from the SD decoder: pretrained part at 0.1x lr."""

from asymvq_jax.train.config import AUTHORS_IMAGENET_SUBSET, default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-base"
    c.init_from = arg or ""  # e.g. --config=configs/asym_base.py:/path/to/sd-vae (diffusers folder or .ckpt)
    c.data.num_images = AUTHORS_IMAGENET_SUBSET  # the horizon counts the authors' 12 epochs of it
    return c
