"""The local default: a small asymmetric decoder on the photos that ship with scikit-image.

Runs in minutes on a laptop CPU and visibly learns: the known region of the mask-guided
decode sharpens first (the branch), the plain decode follows. There is no pretrained SD
encoder offline, so the frozen encoder is a random one: the latents still carry the image.
"""

from asymvq_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.overrides = {"down_block_out_channels": (32, 64, 64, 64), "layers_per_down_block": 1,
                         "up_block_out_channels": (32, 64, 64, 64), "layers_per_up_block": 1,
                         "norm_num_groups": 16}
    c.data.source = "bundled_photos"
    c.image_size, c.batch_size = 64, 4
    c.total_steps = int(arg) if arg else 400
    c.lr, c.warmup_steps = 2e-4, 20
    c.loss.disc_start = c.total_steps // 2 + 1
    c.disc.ndf = 32
    c.log_every, c.sample_every, c.checkpoint_every = 10, 100, 100
    return c
