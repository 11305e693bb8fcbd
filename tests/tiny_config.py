"""A decoder small enough to train a few steps in a test (also run by train.py in a subprocess)."""

from asymvq_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.overrides = {"down_block_out_channels": (8, 16, 16, 16), "layers_per_down_block": 1,
                         "up_block_out_channels": (8, 16, 16, 16), "layers_per_up_block": 1,
                         "norm_num_groups": 4}
    c.random_encoder = True  # no checkpoint to take an encoder from
    c.data.source = "folder"
    c.data.num_workers = 1
    c.image_size, c.batch_size = 32, 2
    c.total_steps = 6
    c.loss.disc_start = 4
    # A constant learning rate, so a run's losses do not depend on where total_steps ends.
    c.lr, c.warmup_steps, c.warmup_init_mult, c.end_lr = 1e-3, 1, 1.0, 1e-3
    c.disc.ndf = 8
    c.ema_decay = 0.5
    c.log_every, c.sample_every, c.checkpoint_every, c.keep_checkpoints = 1, 3, 2, 5
    return c
