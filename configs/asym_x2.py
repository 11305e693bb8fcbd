"""Asymmetric x2 decoder, trained from scratch against the frozen SD encoder."""

from asymvq_jax.train.config import AUTHORS_IMAGENET_SUBSET, default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-x2"
    c.init_from = arg or ""  # the SD VAE: the frozen encoder comes from it
    c.init_decoder = False   # and nothing else: the whole decoder is new and trains at 1x, as the authors'
    c.batch_size = 16        # 8 GPUs x 2
    c.loss.gan_group_size = 2  # one GPU's images: the adaptive weight and disc statistics per GPU
    c.data.num_images = AUTHORS_IMAGENET_SUBSET  # the horizon counts the authors' 12 epochs of it
    return c
