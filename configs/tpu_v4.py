"""An asymmetric decoder recipe on a TPU v4 slice: ImageNet from TFDS in a bucket, workdir in the bucket.

    python train.py --config configs/tpu_v4.py:bucket=my-bucket,variant=x1.5
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py --config configs/tpu_v4.py:runlocal

Arguments (comma-separated): variant (base | x1.5 | x2), bucket, init_from (the VAE whose encoder and
latent family the decoder serves), family (sd | sdxl | sd3 | flux: of an init_from file without a config), batch (global),
fsdp (devices that split each large parameter), runlocal (a tiny model on the bundled photos,
fsdp 2: the same code path on a CPU with simulated devices, no bucket needed).
"""

from asymvq_jax.train.config import AUTHORS_IMAGENET_SUBSET, default_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="x1.5", bucket="", init_from="", family="", batch=128, fsdp=1, runlocal=False)
    if not arg.bucket and not arg.runlocal:
        raise ValueError("configs/tpu_v4.py: no bucket set; give yours: --config configs/tpu_v4.py:bucket=NAME "
                         "(or :runlocal to try it on this machine)")
    c = default_config()
    c.model.preset = f"asym-{arg.variant}"
    c.init_from, c.init_family = arg.init_from, arg.family
    c.batch_size = arg.batch               # global; v4-32 (16 chips) x 8
    c.data.num_images = AUTHORS_IMAGENET_SUBSET   # the authors' 12 epochs (lr = base_lr x batch, as theirs)
    # The authors' per-GPU statistics whatever the slice (the step does not depend on the mesh): groups
    # of one of their GPUs' images, 4 for x1.5 and 2 for x2; base's 10 does not divide 128, so 8.
    c.loss.gan_group_size = {"base": 8, "x1.5": 4, "x2": 2}[arg.variant]
    c.dtype = "bfloat16"                   # compute; parameters and optimizer state stay float32
    c.remat = "full"
    c.mesh.data, c.mesh.fsdp = -1, arg.fsdp
    c.data.source, c.data.name = "tfds", "imagenet2012"
    c.data.data_dir = f"gs://{arg.bucket}/tensorflow_datasets"
    c.workdir = f"gs://{arg.bucket}/runs/asym_{arg.variant}"
    c.compilation_cache_dir = f"gs://{arg.bucket}/jax_cache"
    c.checkpoint_every, c.log_every = 2000, 100

    if arg.runlocal:
        c.model.overrides = {"down_block_out_channels": (16, 32, 32, 32), "layers_per_down_block": 1,
                             "up_block_out_channels": (16, 32, 32, 32), "layers_per_up_block": 1,
                             "norm_num_groups": 8}
        c.disc.ndf = 16
        c.random_encoder = True   # no SD weights offline: the frozen encoder is random, on purpose
        c.data.source, c.data.data_dir, c.data.num_images = "bundled_photos", None, 0
        c.image_size, c.batch_size, c.total_steps = 32, 8, 3
        c.mesh.fsdp, c.mesh.fsdp_min_size = 2, 2**10   # small enough that the tiny kernels split too
        c.workdir, c.compilation_cache_dir = "runs/tpu_v4_runlocal", ""
        c.checkpoint_every, c.log_every, c.sample_every = 3, 1, 3
    return c
