"""Asymmetric x1.5 decoder, trained from scratch against the frozen SD encoder."""

from asymvq_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-x1.5"
    c.init_from = arg or ""  # the SD VAE: the frozen encoder comes from it
    c.batch_size = 32        # 8 GPUs x 4
    c.lr = 4.5e-6 * c.batch_size  # 1.44e-4
    return c
