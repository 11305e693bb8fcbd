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
    # Compiling is most of a test's time, running these tiny steps little: XLA's fast-compile preset for
    # the CPU and LLVM at -O0 (the simulated-device processes' XLA_FLAGS, tests/conftest.py). Measured, the
    # train step's compile in one process: 94.9 s of CPU by default, 66.3 with the preset alone, 43.5 with
    # these options, 28.8 with them beside those XLA_FLAGS (55.7 with the flags alone).
    c.compiler_options = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE", "xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True}
    return c
