"""The authors' recipe as a ConfigDict; the files in configs/ start from it and change what differs."""

import ml_collections

from asymvq_jax.losses import gan


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"preset": "asym-base", "overrides": {}})
    c.init_from = ""                 # any checkpoint from_pretrained reads; "" = from scratch
    c.pretrained_lr_mult = 0.1       # decoder parameters taken from init_from; the new branch gets 1x
    c.train_encoder = False          # True: the whole autoencoder trains (LDM's first stage), KL included
    c.dtype, c.param_dtype = "float32", "float32"   # compute, storage (and optimizer state)
    c.remat = ""                     # "" = off, "full" = keep only block inputs, or a jax.checkpoint_policies name

    c.batch_size = 80                # global: 8 GPUs x 10 in the paper
    c.image_size = 256
    c.total_steps = 120_030          # where the released x1.5 weights stopped
    c.lr = 4.5e-6 * c.batch_size     # the authors scale a base lr by the global batch
    c.warmup_steps, c.warmup_init_mult, c.end_lr = 5000, 0.01, 1e-6
    c.ema_decay = 0.0                # 0 = no EMA copy of the decoder

    c.loss = ml_collections.ConfigDict({
        "perceptual_weight": gan.PERCEPTUAL_WEIGHT, "kl_weight": gan.KL_WEIGHT, "disc_weight": gan.DISC_WEIGHT,
        "disc_factor": 1.0, "disc_start": gan.DISC_START, "lpips_weights": ""})   # "" = the default weight file
    c.disc = ml_collections.ConfigDict({"ndf": 64, "n_layers": 3})

    c.data = ml_collections.ConfigDict({
        "source": "tfds", "name": "imagenet2012", "split": "train", "data_dir": None, "path": "",
        "mask": "thick_256", "all_ones_prob": 0.5})

    # Every eval_every steps (0 = never): the eval metrics on a fixed split, TFDS `split` or the images of
    # `path` (default: the training images, then not held out), with the shipped `masks` set.
    c.eval_every = 5000
    c.eval = ml_collections.ConfigDict({"num_images": 32, "split": "validation", "path": "", "masks": "thick_256",
                                        "batch_size": 0})   # 0 = config.batch_size

    c.workdir = ""                   # "" = runs/<config name>; --workdir overrides
    c.log_every, c.sample_every = 50, 1000
    c.checkpoint_every, c.keep_checkpoints = 1000, 3

    # Devices and hosts. mesh: data x fsdp devices (-1 = the rest); fsdp also splits every
    # array of at least fsdp_min_size elements. distributed: a coordinator for hosts jax does
    # not discover itself (Cloud TPU pods are discovered).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_size": 2**18})
    c.distributed = ml_collections.ConfigDict({
        "coordinator_address": "", "num_processes": 1, "process_id": 0, "cpu_collectives": "",
        "heartbeat_timeout_s": 100})  # a host silent this long counts as dead (a busy CPU can starve it)
    c.compilation_cache_dir = ""     # e.g. gs://bucket/jax_cache: restarts skip recompiling
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style config arguments: "runlocal,variant=x2" over `defaults`. A bare name
    switches a flag on; a value takes the type of its default."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r} in {arg!r}; known: {sorted(defaults)}")
        kind = type(defaults[name])
        if kind is bool:
            out[name] = value.lower() not in ("0", "false", "no") if value else True
        else:
            out[name] = kind(value)
    return out
