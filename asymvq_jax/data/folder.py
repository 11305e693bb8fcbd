"""Local image folders: file listing, robust decoding, and bundled sample photos.

:func:`list_images` finds images recursively (``.jpg .jpeg .png .webp``, any case) and
fails clearly on a missing or empty folder. :func:`decode_rgb` turns any image file or
byte string into ``uint8 [H, W, 3]``:

* grayscale (``L``, ``1``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB;
* palette (``P``) -> RGB, palette with transparency is treated as RGBA;
* ``RGBA``/``LA``/``PA`` and images with a transparency key: **composited on white**;
* 16/32-bit integer (``I;16``, ``I;16B``, ``I``): divided by 257 (65535 -> 255), clipped;
* float (``F``): clipped to [0, 255].

Corrupt or truncated files raise :class:`BadImageError` (the pipeline skips and counts
them). :func:`sample_photos_dir` writes the real photos shipped inside the
scikit-image wheel (falling back to scikit-learn / matplotlib if that is what is
installed) as PNGs into a folder, for tiny local training runs.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from asymvq_jax import paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "list_images",
    "decode_rgb",
    "sample_photos_dir",
]


class BadImageError(Exception):
    """An image that cannot be decoded (corrupt, truncated, empty, unsupported)."""


def list_images(root: str | os.PathLike) -> list[str]:
    """Sorted paths of all images under ``root`` (recursive, local symlinks followed; ``gs://`` too)."""
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
    """Decode ``src`` (path or encoded bytes) to ``uint8 [H, W, 3]``.

    Returns ``(array, note)``; ``note`` describes a conversion (None for plain RGB).
    Raises :class:`BadImageError` for anything that cannot be decoded.
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


def _skimage_photos():
    import skimage.data as d  # noqa: PLC0415

    names = [
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
        "immunohistochemistry", "retina", "camera", "coins", "moon",
    ]
    for n in names:
        yield n, lambda n=n: getattr(d, n)()
    yield "motorcycle_left", lambda: d.stereo_motorcycle()[0]


def _sklearn_photos():
    from sklearn.datasets import load_sample_images  # noqa: PLC0415

    imgs = load_sample_images()
    for fname, img in zip(imgs.filenames, imgs.images):
        yield Path(fname).stem, lambda img=img: img


def _matplotlib_photos():
    import matplotlib.cbook  # noqa: PLC0415

    def load():
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))

    yield "grace_hopper", load


def sample_photos_dir(dst: str | os.PathLike) -> str:
    """Write the real photos bundled in installed wheels into ``dst`` as PNGs.

    Uses scikit-image (``skimage.data``: astronaut, chelsea, coffee, rocket,
    hubble_deep_field, immunohistochemistry, retina, camera, coins, moon,
    motorcycle_left) -- the recommended dependency -- plus scikit-learn's sample images
    (china, flower) and matplotlib's ``grace_hopper.jpg`` when those packages happen to
    be installed. Nothing is downloaded. Existing files are kept. Returns ``dst``.
    Raises ``RuntimeError`` if none of the packages is installed.
    """
    dst = os.fspath(dst)
    written = 0
    for provider in (_skimage_photos, _sklearn_photos, _matplotlib_photos):
        try:
            items = list(provider())
        except ImportError:
            continue
        for name, load in items:
            path = paths.join(dst, f"{name}.png")
            if paths.exists(path):
                written += 1
                continue
            try:
                arr = np.asarray(load())
            except Exception:  # noqa: BLE001 - e.g. a loader that would need a download
                continue
            if arr.dtype != np.uint8:
                arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            if arr.ndim == 3 and arr.shape[-1] == 4:
                arr = arr[..., :3]
            png = io.BytesIO()
            Image.fromarray(arr).save(png, format="PNG")
            paths.write_bytes(path, png.getvalue())
            written += 1
    if not written:
        raise RuntimeError(
            "sample_photos_dir: no bundled photos found; install scikit-image "
            "(pip install scikit-image)"
        )
    return dst
