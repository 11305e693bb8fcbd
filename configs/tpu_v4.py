"""The x1.5 recipe sized for a TPU v4 slice: global batch over every chip, ImageNet from TFDS.

    python train.py --config configs/tpu_v4.py:gs://bucket/sd-vae --workdir gs://bucket/runs/x1_5 \
        --config.data.data_dir=gs://bucket/tensorflow_datasets
"""

from asymvq_jax.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.preset = "asym-x1.5"
    c.init_from = arg or ""
    c.batch_size = 128               # e.g. v4-32: 16 chips x 8
    c.lr = 4.5e-6 * c.batch_size
    c.dtype = "bfloat16"             # compute; parameters and optimizer stay float32
    c.remat = True
    c.data.data_dir = "gs://YOUR_BUCKET/tensorflow_datasets"
    c.checkpoint_every = 2000
    return c
