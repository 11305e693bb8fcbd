"""Training data: LaMa masks, image folders / TFDS sources, the deterministic pipeline.

See :mod:`asymvq_jax.data.pipeline` for the iterator contract and config fields.
TensorFlow is only imported when ``config.data.source == "tfds"``.
"""

from asymvq_jax.data.folder import (
    IMAGE_EXTENSIONS,
    BadImageError,
    decode_rgb,
    list_images,
    sample_photos_dir,
)
from asymvq_jax.data.masks import (
    MASK_VARIANTS,
    MaskParams,
    example_rng,
    lama_mask,
    training_mask,
)
from asymvq_jax.data.pipeline import (
    FolderSource,
    TrainIterator,
    batch_for_step,
    make_source,
    make_train_iterator,
    random_crop_resize,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "decode_rgb",
    "list_images",
    "sample_photos_dir",
    "MASK_VARIANTS",
    "MaskParams",
    "example_rng",
    "lama_mask",
    "training_mask",
    "FolderSource",
    "TrainIterator",
    "batch_for_step",
    "make_source",
    "make_train_iterator",
    "random_crop_resize",
]
