"""Training and evaluation data: LaMa masks, image folders and TFDS, the deterministic pipeline
(`pipeline` says what a batch is a function of). TensorFlow is imported only for TFDS sources."""

from asymvq_jax.data.folder import (
    BUNDLED_PHOTOS,
    HELD_OUT_PHOTOS,
    IMAGE_EXTENSIONS,
    TRAIN_PHOTOS,
    BadImageError,
    bundled_photo,
    decode_rgb,
    list_images,
)
from asymvq_jax.data.masks import (
    MASK_VARIANTS,
    MaskParams,
    example_rng,
    lama_mask,
    training_mask,
)
from asymvq_jax.data.pipeline import (
    BundledPhotos,
    FolderSource,
    TrainIterator,
    batch_for_step,
    held_out_batch,
    make_source,
    make_train_iterator,
    random_crop_resize,
)

__all__ = [
    "BUNDLED_PHOTOS",
    "HELD_OUT_PHOTOS",
    "TRAIN_PHOTOS",
    "bundled_photo",
    "BundledPhotos",
    "held_out_batch",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "decode_rgb",
    "list_images",
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
