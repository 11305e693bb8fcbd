"""Asymmetric x2 decoder, trained from scratch against the frozen SD encoder."""

from asymvq_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-x2"
    c.init_from = arg or ""  # the SD VAE: the frozen encoder comes from it
    c.batch_size = 16        # 8 GPUs x 2
    c.lr = 4.5e-6 * c.batch_size  # 7.2e-5
    return c
