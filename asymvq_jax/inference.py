"""Inference for users: jitted encode and decode, images and masks from files, tiled decoding.

The jitted functions take the model split into a graph (static) and its state, so XLA compiles
once per model structure, input shape and dtype, and every later call of that shape reuses it.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from asymvq_jax import paths
from asymvq_jax.models import AutoencoderKL


# -- the model ---------------------------------------------------------------------------------

def load_model(source, *, dtype=jnp.float32, step: int | None = None, allow_pickle: bool = False) -> AutoencoderKL:
    """A model from anything `from_pretrained` reads, a training workdir, or a model (recast to `dtype`)."""
    from asymvq_jax import checkpoint
    from asymvq_jax.convert import build_model, from_pretrained, model_params
    dtype = jnp.dtype(dtype)
    if isinstance(source, AutoencoderKL):
        vae = source
    elif checkpoint.is_workdir(os.fspath(source)):
        vae = checkpoint.load_model(os.fspath(source), step=step)
    else:
        return from_pretrained(source, allow_pickle=allow_pickle, dtype=dtype)
    if compute_dtype(vae) == dtype:
        return vae
    return build_model(vae.config, model_params(vae), dtype=dtype)


def compute_dtype(vae: AutoencoderKL):
    return jnp.dtype(vae.post_quant_conv.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x).mode()


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z, image, mask):
    return nnx.merge(graphdef, state).decode(z, image, mask)


@functools.partial(jax.jit, static_argnums=0)
def _decode_mid(graphdef, state, z):
    vae = nnx.merge(graphdef, state)
    return vae.decoder.mid(vae.post_quant_conv(z))


@functools.partial(jax.jit, static_argnums=0)
def _decode_up(graphdef, state, h, image, mask):
    decoder = nnx.merge(graphdef, state).decoder
    return decoder.conv_out(decoder.up(h, image, mask))


def encode(vae: AutoencoderKL, x) -> jax.Array:
    """The posterior mode (unscaled latents) of images [B, H, W, 3] in [-1, 1], H and W multiples of 8."""
    return _encode(*nnx.split(vae), jnp.asarray(x, compute_dtype(vae)))


def decode(vae: AutoencoderKL, z, image=None, mask=None) -> jax.Array:
    """Unscaled latents -> images; with image and mask, mask-guided (batch-1 image/mask broadcast)."""
    dtype = compute_dtype(vae)
    z = jnp.asarray(z, dtype)
    if image is not None or mask is not None:
        image, mask = vae._check_condition(z, None if image is None else jnp.asarray(image, dtype),
                                           None if mask is None else jnp.asarray(mask, dtype))
    return _decode(*nnx.split(vae), z, image, mask)


# -- tiled decoding ----------------------------------------------------------------------------

def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of equal tiles that cover [0, size), neighbours sharing >= overlap."""
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    """Blend weights along one tile axis: linear over `fade` pixels at the edges shared with a neighbour."""
    w = np.ones(length, np.float32)
    rise = (np.arange(fade, dtype=np.float32) + 0.5) / fade
    if fade_start:
        w[:fade] = rise
    if fade_end:
        w[length - fade:] = rise[::-1]
    return w


def decode_tiled(vae: AutoencoderKL, z, image=None, mask=None, *, tile: int = 64, overlap: int = 16,
                 progress: bool = False) -> np.ndarray:
    """`decode` with the up levels in overlapping latent tiles of `tile` x `tile`, blended linearly
    across the overlap. The mid block (and its attention) runs on the whole latent first: it is
    small; the up levels hold nearly all the memory. Their GroupNorms see one tile at a time, so
    the result differs slightly from an untiled decode.
    """
    if overlap <= 0 or overlap * 2 > tile:
        raise ValueError(f"tile overlap must be in [1, tile/2]; got tile={tile}, overlap={overlap}")
    dtype = compute_dtype(vae)
    z = jnp.asarray(z, dtype)
    b, h, w, _ = z.shape
    if image is not None or mask is not None:
        image, mask = (np.asarray(a) for a in vae._check_condition(z, jnp.asarray(image, dtype),
                                                                   jnp.asarray(mask, dtype)))
    graphdef, state = nnx.split(vae)
    mid = np.asarray(_decode_mid(graphdef, state, z))
    s = vae.downscale
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    out = np.zeros((b, h * s, w * s, vae.config.out_channels), np.float32)
    total = np.zeros((1, h * s, w * s, 1), np.float32)
    bar = _progress(len(ys) * len(xs), progress, "tiles")
    for y in ys:
        wy = ramp(th * s, overlap * s, y > 0, y + th < h)
        for x in xs:
            wx = ramp(tw * s, overlap * s, x > 0, x + tw < w)
            pixels = np.s_[:, y * s:(y + th) * s, x * s:(x + tw) * s]
            cond = (None, None) if image is None else (image[pixels], mask[pixels])
            weight = (wy[:, None] * wx[None, :])[None, :, :, None]
            tile_out = _decode_up(graphdef, state, mid[:, y:y + th, x:x + tw], *cond)
            out[pixels] += weight * np.asarray(tile_out, np.float32)
            total[pixels] += weight
            bar.update()
    bar.close()
    return out / total


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled or total <= 1, unit=unit, leave=False)


# -- images and masks from files ---------------------------------------------------------------

def read_image(path) -> np.ndarray:
    """[H, W, 3] float32 in [-1, 1] from any image PIL reads."""
    with Image.open(_existing(path)) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0


def read_mask(path) -> np.ndarray:
    """[H, W, 1] float32, 1 = the hole; the file must hold two values only (black and white)."""
    with Image.open(_existing(path)) as im:
        m = np.asarray(im.convert("L"))
    values = np.unique(m)
    if not set(values.tolist()) <= {0, 255} and not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"{path}: the mask is not binary: {len(values)} grey levels (e.g. "
                         f"{values[:6].tolist()}); save it as black (keep) and white (hole) PNG")
    return (m > 0).astype(np.float32)[..., None]


def write_image(path, x) -> None:
    """Writes [H, W, 3] in [-1, 1] as 8-bit; whole or not at all."""
    pixels = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    with paths.atomic_output(path, is_dir=False) as tmp:
        Image.fromarray(pixels).save(tmp, format=_format(path))


def _format(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext, "PNG")


def _existing(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Mirrors [H, W, C] past the bottom and right edges so H and W are multiples of `multiple`."""
    h, w = x.shape[:2]
    pads = [(0, -h % multiple), (0, -w % multiple), (0, 0)]
    return np.pad(x, pads, mode="reflect" if min(h, w) > multiple else "edge")


# -- whole images of any size ------------------------------------------------------------------

def check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape[:-1] != mask.shape[:-1]:
        raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                         f"{image.shape[1]}x{image.shape[0]}: they must be the same size")


def decode_images(vae: AutoencoderKL, z, image=None, mask=None, *, tile: int | None = None,
                  progress: bool = False) -> np.ndarray:
    """Latents [B, h, w, C] against one image [H, W, 3] and mask [H, W, 1] of any size (h = ceil(H/8)):
    pads, decodes (tiled when `tile` is given), crops back. Returns [B, H, W, 3]."""
    z = np.asarray(z, np.float32)
    latent = vae.config.latent_channels
    if image is None:
        size = (z.shape[1] * vae.downscale, z.shape[2] * vae.downscale)
        cond = (None, None)
    else:
        check_pair(image, mask)
        size = image.shape[:2]
        cond = (pad_to_multiple(image, vae.downscale)[None], pad_to_multiple(mask, vae.downscale)[None])
    expected = (-(-size[0] // vae.downscale), -(-size[1] // vae.downscale), latent)
    if z.ndim != 4 or z.shape[1:] != expected:
        raise ValueError(f"latents have shape {z.shape}; a {size[1]}x{size[0]} image needs "
                         f"[B, {', '.join(map(str, expected))}]")
    if tile:
        y = decode_tiled(vae, z, *cond, tile=tile, overlap=max(1, tile // 4), progress=progress)
    else:
        y = np.asarray(decode(vae, z, *cond), np.float32)
    return y[:, :size[0], :size[1]]


def reconstruct(vae: AutoencoderKL, image: np.ndarray, mask: np.ndarray, *, tile: int | None = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes one image [H, W, 3] of any size; returns its plain and mask-guided decodes."""
    check_pair(image, mask)
    z = encode(vae, pad_to_multiple(image, vae.downscale)[None])
    plain = decode_images(vae, z, tile=tile, progress=progress)[0, :image.shape[0], :image.shape[1]]
    return plain, decode_images(vae, z, image, mask, tile=tile, progress=progress)[0]


# -- files in, PNG out (the decode.py commands) ------------------------------------------------

def read_latents(path, channels: int, key: str | None = None) -> np.ndarray:
    """[B, h, w, C] float32 from .npy or .safetensors holding [B, C, h, w] (torch) or [B, h, w, C]."""
    path = os.fspath(path)
    _existing(path)
    if path.endswith(".npy"):
        z = np.load(path, allow_pickle=False)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        tensors = load_file(path)
        if key is None and len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}: name the latents' key")
        z = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        raise ValueError(f"{path}: latents must be a .npy or .safetensors file")
    z = z[None] if z.ndim == 3 else z
    if z.ndim == 4 and z.shape[1] == channels:
        z = z.transpose(0, 2, 3, 1)
    if z.ndim != 4 or z.shape[-1] != channels:
        raise ValueError(f"{path}: latents of shape {z.shape}; expected [B, {channels}, h, w] or [B, h, w, {channels}]")
    return z.astype(np.float32)


def reconstruct_file(model, image_path, mask_path, out, *, dtype=jnp.float32, step=None, allow_pickle=False,
                     **kw) -> list[str]:
    """Writes input | masked input | plain decode | mask-guided decode side by side.
    `model`: a model or anything `load_model` takes, loaded once the inputs have passed their checks."""
    image, mask = read_image(image_path), read_mask(mask_path)
    check_pair(image, mask)
    vae = load_model(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
    plain, guided = reconstruct(vae, image, mask, **kw)
    write_image(out, np.concatenate([image, image * (1 - mask), plain, guided], axis=1))
    return [os.fspath(out)]


def decode_file(model, latents_path, image_path, mask_path, out, *, scaled: bool, key=None, dtype=jnp.float32,
                step=None, allow_pickle=False, **kw) -> list[str]:
    """Decodes every latent in the file against the image and mask; one PNG per latent."""
    image, mask = read_image(image_path), read_mask(mask_path)
    check_pair(image, mask)
    _existing(latents_path)
    vae = load_model(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
    z = read_latents(latents_path, vae.config.latent_channels, key)
    if scaled:
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = decode_images(vae, z, image, mask, **kw)
    stem, ext = os.path.splitext(os.fspath(out))
    paths = [os.fspath(out)] if len(images) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(images))]
    for path, y in zip(paths, images):
        write_image(path, y)
    return paths
