"""Images, masks, latents and image grids from and to files, local or gs://; for inference,
evaluation and training alike."""

import io
import os

import numpy as np
import safetensors.numpy
from PIL import Image, ImageDraw, ImageFont

from asymvq_jax import paths


def existing(path):
    if not paths.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _read(path) -> bytes:
    return paths.read_bytes(existing(path))


def read_image(path) -> np.ndarray:
    """[H, W, 3] float32 in [-1, 1] from any image PIL reads."""
    with Image.open(io.BytesIO(_read(path))) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0


def read_mask(path) -> np.ndarray:
    """[H, W, 1] float32, 1 = the hole; the file must hold two values only (black and white)."""
    with Image.open(io.BytesIO(_read(path))) as im:
        m = np.asarray(im.convert("L"))
    values = np.unique(m)
    if not set(values.tolist()) <= {0, 255} and not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"{path}: the mask is not binary: {len(values)} grey levels (e.g. "
                         f"{values[:6].tolist()}); save it as black (keep) and white (hole) PNG")
    return (m > 0).astype(np.float32)[..., None]


def is_image(path) -> bool:
    try:
        with Image.open(paths.path(path).open("rb")) as im:
            return bool(im.format)
    except (OSError, ValueError):
        return False


def to_uint8(images) -> np.ndarray:
    """[-1, 1] -> 0..255, rounded."""
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).round(), np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_image(path, x) -> None:
    """Writes [H, W, 3] in [-1, 1] as 8-bit; whole or not at all."""
    with paths.atomic_output(path, is_dir=False) as tmp:
        Image.fromarray(to_uint8(x)).save(tmp, format=_format(path))


def _format(path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(paths.path(path).suffix.lower(), "PNG")


def save_grid(path: str, columns: dict[str, np.ndarray], min_cell: int = 256) -> None:
    """One row per example, one labelled column per [B, H, W, 3] batch in [-1, 1]; small images
    are enlarged (nearest, whole pixels) to at least `min_cell` pixels so they can be seen."""
    scale = max(1, -(-min_cell // next(iter(columns.values())).shape[1]))
    cells = [to_uint8(batch).repeat(scale, axis=1).repeat(scale, axis=2) for batch in columns.values()]
    body = np.concatenate([np.concatenate(list(cell), axis=0) for cell in cells], axis=1)
    width = cells[0].shape[2]
    header = Image.new("RGB", (body.shape[1], 28), "white")
    draw = ImageDraw.Draw(header)
    for i, label in enumerate(columns):
        draw.text((i * width + width // 2, 14), label, fill="black", anchor="mm", font=ImageFont.load_default(18))
    paths.write_bytes(path, png_bytes(np.concatenate([np.asarray(header), body], axis=0)))


def unpack_latents(packed, height: int, width: int, downscale: int = 8) -> np.ndarray:
    """FLUX pipelines' packed latents [B, (h/2)(w/2), 4C] (each token a 2x2 patch, channel-major) for an
    image of height x width pixels -> [B, h, w, C], with h = 2 * (height // (2 * downscale)) as they use."""
    packed = np.asarray(packed)
    h, w = 2 * (height // (2 * downscale)), 2 * (width // (2 * downscale))
    b, n, c4 = packed.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"packed latents of shape {packed.shape} do not fit a {width}x{height} image: "
                         f"expected [B, {(h // 2) * (w // 2)}, 4 x channels]")
    return packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c4 // 4)


def read_latents(path, channels: int, key: str | None = None, image_size: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """[B, h, w, C] float32 from .npy or .safetensors holding [B, C, h, w] (torch) or [B, h, w, C] (or
    one latent without B), or FLUX's packed [B, (h/2)(w/2), 4C] when `image_size` (H, W) is given
    (`unpack_latents`). A .safetensors file's tensor: `key`, else its only one or "latents"."""
    path = os.fspath(path)
    if not path.endswith((".npy", ".safetensors")):
        raise ValueError(f"{path}: latents must be a .npy or .safetensors file")
    data = _read(path)
    if path.endswith(".npy"):
        z = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        tensors = safetensors.numpy.load(data)
        key = key or (next(iter(tensors)) if len(tensors) == 1 else "latents")
        if key not in tensors:
            raise ValueError(f"{path} holds {sorted(tensors)}: name the latents' key")
        z = tensors[key]
    if z.ndim == 3 and z.shape[-1] == 4 * channels and image_size is not None and z.shape[0] != channels:
        return unpack_latents(z, *image_size).astype(np.float32)
    z = z[None] if z.ndim == 3 else z
    if z.ndim == 4 and z.shape[1] == channels:  # diffusers' layout; it wins where both read the same
        z = z.transpose(0, 2, 3, 1)
    if z.ndim != 4 or z.shape[-1] != channels:
        raise ValueError(f"{path}: latents of shape {z.shape}; expected [B, {channels}, h, w] or [B, h, w, {channels}]")
    return z.astype(np.float32)
