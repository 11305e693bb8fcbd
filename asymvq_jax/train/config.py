"""The authors' recipe as a ConfigDict; the files in configs/ start from it and change what differs."""

import logging

import ml_collections
import numpy as np

from asymvq_jax.data import make_source
from asymvq_jax.losses import gan
from asymvq_jax.models.blocks import fresh_init


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"preset": "asym-base", "overrides": {}})
    c.init_from = ""                 # any checkpoint from_pretrained reads; "" = from scratch. Its encoder,
                                     # latent channels, quant convs and factors are kept; the preset names the decoder
    c.init_family = ""               # sd|sdxl|sd3|flux: the family of a single-file init_from without a config
    c.init_decoder = True            # False: init_from gives the frozen parts only, the decoder starts fresh
    c.pretrained_lr_mult = 0.1       # decoder parameters taken from init_from; the new branch gets 1x
    c.train_encoder = False          # True: the whole autoencoder trains (LDM's first stage), KL included;
                                     # it ends by measuring its scaling_factor (1 / latent std) on the training data
    c.measure_shift = False          # ... and its shift_factor (the latent mean), as SD3 and FLUX did
    c.factor_batches = 8             # training batches those factors are measured on
    c.fresh_init = "torch"           # the layers init_from does not give: torch's default, as the authors'
                                     # start; "lecun" = flax's default (lecun-normal weights, zero biases)
    c.random_encoder = False         # True: a decoder-only run without init_from, against a random frozen
                                     # encoder, on purpose (tests, runlocal); otherwise that run is refused
    c.dtype, c.param_dtype = "float32", "float32"   # compute, storage (and optimizer state)
    c.remat = ""                     # "" = off, "full" = keep only block inputs, or a jax.checkpoint_policies name

    c.batch_size = 80                # global: 8 GPUs x 10 in the paper
    c.image_size = 256
    # The horizon: the run stops, and every cosine reaches end_lr, at total_steps; 0 = epochs x the
    # number of training images // batch_size, as the authors count it (12 epochs of their subset).
    c.epochs, c.total_steps = 12, 0
    # The lr is base_lr x the global batch, from the batch after every override; lr > 0 sets it outright.
    c.base_lr, c.lr = 4.5e-6, 0.0
    # Both decoder groups and the discriminator warm up from warmup_init_mult x, then a cosine to the
    # absolute end_lr; the discriminator's lr is 0 until loss.disc_start, then its own warm-up.
    c.warmup_steps, c.warmup_init_mult, c.end_lr = 5000, 0.01, 1e-6
    c.ema_decay = 0.0                # 0 = no EMA copy of the decoder

    c.loss = ml_collections.ConfigDict({
        "perceptual_weight": gan.PERCEPTUAL_WEIGHT, "kl_weight": gan.KL_WEIGHT, "disc_weight": gan.DISC_WEIGHT,
        "disc_factor": 1.0, "disc_start": gan.DISC_START, "lpips_weights": "",   # "" = the default weight file
        # Images per group for the adaptive GAN weight and the discriminator's BatchNorm statistics, as
        # each of the authors' 8 GPUs takes them from its own images (0 = the whole global batch).
        "gan_group_size": 0,
        # Not the authors': the L1 term weighted (1 + border_weight) x within border_width pixels of the hole's border.
        "border_weight": 0.0, "border_width": 2,
        # Not the authors': gan.branch_gap (the branch's features against the decoder's own, in the known
        # region) times this, added to the loss; 0 = off.
        "branch_gap_weight": 0.0})
    c.disc = ml_collections.ConfigDict({"ndf": 64, "n_layers": 3})

    c.data = ml_collections.ConfigDict({
        "source": "tfds", "name": "imagenet2012", "split": "train", "data_dir": None, "path": "",
        "mask": "thick_256", "all_ones_prob": 0.5,
        "flips": "none",      # none|h|dihedral: random flips after the crop (not the authors': see pipeline)
        "colour_gain": 0.0,   # each RGB channel x U(1 -/+ colour_gain) after the flips (not the authors')
        "num_images": 0})   # images in the training split, for the horizon; 0 = counted from the source

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
    # XLA options for compiling the train step and the sampler, e.g. {"xla_cpu_opt_preset":
    # "CPU_OPT_PRESET_FAST_COMPILE"} (configs/local.py); {} = XLA's defaults
    c.compiler_options = {}
    return c


AUTHORS_IMAGENET_SUBSET = 1_152_196   # the HR ImageNet subset their configure_optimizers counts


def derived(config) -> ml_collections.ConfigDict:
    """The config with `lr` and `total_steps` worked out from the batch and data after every
    override (a run's config is resolved once, where it starts)."""
    check(config)
    c = config.copy_and_resolve_references()
    with c.unlocked():
        if not c.lr:
            c.lr = c.base_lr * c.batch_size
            logging.info("lr %s = %s x %d (base_lr x global batch)", short(c.lr), short(c.base_lr), c.batch_size)
        if not c.total_steps:
            images = c.data.get("num_images") or dataset_size(c)
            c.total_steps = c.epochs * (images // c.batch_size)
            logging.info("total_steps %d = %d epochs x (%d images // %d)", c.total_steps, c.epochs, images,
                         c.batch_size)
    return c


def check(config) -> None:
    """Refuses a run that could only be a mistake, before anything is built."""
    if not config.get("train_encoder") and not config.get("init_from") and not config.get("random_encoder"):
        raise ValueError(
            "a decoder-only run (train_encoder=False) needs init_from, the checkpoint whose frozen encoder the "
            "decoder learns to serve: pass --config.init_from=/path/to/sd-vae (or configs/asym_x1_5.py:/path); "
            "set --config.random_encoder=True to train against a random encoder on purpose")
    fresh_init(config.get("fresh_init", "torch"), 1)  # a bad name fails here, before anything is built
    group = config.loss.get("gan_group_size", 0)
    if group and config.batch_size % group:
        raise ValueError(f"loss.gan_group_size={group} does not divide batch_size={config.batch_size}: "
                         "pick a batch of whole groups, or another --config.loss.gan_group_size (0 = the whole batch)")


def short(x: float) -> str:
    return np.format_float_scientific(x, precision=3, trim="-", exp_digits=1)


def dataset_size(config) -> int:
    """Images in the training source: a TFDS split's size from its info, a folder's image count."""
    return len(make_source(config, process_index=0, process_count=1))


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
