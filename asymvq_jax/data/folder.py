"""Image files and the bundled photo set.

`list_images` finds images recursively and fails clearly on a missing or empty folder.
`decode_rgb` turns any image file or byte string into uint8 [H, W, 3]: grayscale, CMYK,
palette and the like become RGB, transparency is composited on white, 16-bit and float
images are scaled to 8 bits; corrupt or truncated files raise `BadImageError` (the pipeline
skips and counts them).

`BUNDLED_PHOTOS` is a declared list of the photos inside pinned wheels (scikit-image's, and
`WHEEL_PHOTOS` from scikit-learn and matplotlib), the same on every machine (nothing is downloaded,
nothing is cached). `HELD_OUT_PHOTOS` feed the sample grids and the end-of-run table and never training.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import warnings

import numpy as np
import skimage.data
from PIL import Image

from asymvq_jax import paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Colour photos that ship inside other wheels pinned in pyproject.toml: (distribution, file in it).
WHEEL_PHOTOS = {"china": ("scikit-learn", "sklearn/datasets/images/china.jpg"),
                "flower": ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
                "grace_hopper": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg")}
BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "motorcycle_left", "camera", "coins", "moon", "grass", "gravel", "brick", "clock",
                  *WHEEL_PHOTOS)
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")
TRAIN_PHOTOS = tuple(name for name in BUNDLED_PHOTOS if name not in HELD_OUT_PHOTOS)


class BadImageError(Exception):
    """An image that cannot be decoded (corrupt, truncated, empty, unsupported)."""


def list_images(root: str | os.PathLike) -> list[str]:
    """Sorted paths of all images under `root` (recursive, local symlinks followed; `gs://` too)."""
    root = os.fspath(root)
    if not paths.isdir(root):
        raise FileNotFoundError(
            f"image folder {root!r} (config.data.path) does not exist or is not a directory"
        )
    out = [f for f in paths.walk_files(root)
           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.rsplit("/", 1)[-1].startswith(".")]
    if not out:
        raise ValueError(
            f"image folder {root!r} (config.data.path) contains no images "
            f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    return out


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert an opened, loaded PIL image to RGB; returns (image, note or None)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im, None
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im).astype(np.float64)
        if mode != "F":
            a = a / 257.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        if a.ndim == 3:  # unusual multi-channel high-bit modes
            a = a[..., :3]
            return Image.fromarray(a, "RGB"), f"{mode}->8-bit"
        return Image.fromarray(a, "L").convert("RGB"), f"{mode}->8-bit"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about palette transparency
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode}+alpha on white"
    return im.convert("RGB"), f"{mode}->RGB"


def decode_rgb(src: str | os.PathLike | bytes) -> tuple[np.ndarray, str | None]:
    """Decode `src` (path or encoded bytes) to `uint8 [H, W, 3]`.

    Returns `(array, note)`; `note` describes a conversion (None for plain RGB).
    Raises `BadImageError` for anything that cannot be decoded.
    """
    try:
        data = src if isinstance(src, (bytes, bytearray, memoryview)) else paths.read_bytes(src)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES is not set)
            if im.width < 1 or im.height < 1:
                raise BadImageError("empty image")
            rgb, note = _to_rgb(im)
            arr = np.array(rgb, dtype=np.uint8)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise BadImageError(f"{type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise BadImageError(f"unexpected decoded shape {arr.shape}")
    return arr, note


def bundled_photo(name: str) -> np.ndarray:
    """One of `BUNDLED_PHOTOS` as uint8 [H, W, 3] (grayscale ones repeated to RGB)."""
    if name not in BUNDLED_PHOTOS:
        raise ValueError(f"{name!r} is not a bundled photo; known: {', '.join(BUNDLED_PHOTOS)}")
    if name in WHEEL_PHOTOS:
        return wheel_photo(*WHEEL_PHOTOS[name])
    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def wheel_photo(distribution: str, file: str) -> np.ndarray:
    """A photo file inside an installed wheel, found through its metadata (the package is not imported)."""
    try:
        path = importlib.metadata.distribution(distribution).locate_file(file)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{file} ships in {distribution}, which is not installed (bash scripts/setup.sh installs it)") from None
    return decode_rgb(str(path))[0]

