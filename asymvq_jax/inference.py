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
from asymvq_jax.models.condition import blend


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


def core_bounds(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Each tile's own part of [0, size): neighbours' overlaps split in the middle, so the parts
    cover every row once."""
    cuts = [0] + [(a + tile + b) // 2 for a, b in zip(starts, starts[1:])] + [size]
    return list(zip(cuts, cuts[1:]))


def _normalize(norm: nnx.GroupNorm, x, stats):
    """`norm` with given per-group (mean, variance) [B, G] in place of x's own; nnx's arithmetic."""
    mean, var = (jnp.repeat(s, norm.group_size, axis=1)[:, None, None, :] for s in stats)
    x, scale, bias = norm.promote_dtype((x, norm.scale[...], norm.bias[...]), dtype=norm.dtype)
    return ((x - mean) * (jax.lax.rsqrt(var + norm.epsilon) * scale) + bias).astype(x.dtype)


def _core_moments(norm: nnx.GroupNorm, x, core):
    """(count, mean, sum of squared deviations) per example and group of x over the tile's core
    (`core`: 1 inside, 0 outside, at latent resolution), in float32 as GroupNorm computes them."""
    f = x.shape[1] // core.shape[0]
    inside = jnp.repeat(jnp.repeat(core, f, 0), f, 1)[None, :, :, None, None]
    g = x.astype(jnp.float32).reshape(*x.shape[:3], norm.num_groups, -1)
    count = inside.sum() * g.shape[-1]
    mean = (g * inside).sum((1, 2, 4)) / count
    return count, mean, (inside * (g - mean[:, None, None, :, None]) ** 2).sum((1, 2, 4))


def _global_stats(moments) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile moments merged (Chan et al.) into the mean and variance of the whole image, in float64."""
    counts, means, m2s = ([np.asarray(m[i], np.float64) for m in moments] for i in range(3))
    n = sum(counts)
    mean = sum(c * m for c, m in zip(counts, means)) / n
    m2 = sum(s + c * (m - mean) ** 2 for c, m, s in zip(counts, means, m2s))
    return mean.astype(np.float32), (m2 / n).astype(np.float32)


def _num_stages(decoder) -> int:
    return 2 * sum(len(block.resnets) for block in decoder.up_blocks) + 2


def _blend_level(decoder, k: int) -> int | None:
    """Which branch feature (0 = the deepest) stage k blends in at its end: stage 0 and the end of each
    up block blend (see `Decoder.up`)."""
    end = 0
    for level, block in enumerate(decoder.up_blocks):
        if k == end:
            return level
        end += 2 * len(block.resnets)
    return len(decoder.up_blocks) if k == end else None


@functools.partial(jax.jit, static_argnums=(0, 2))
def _tile_stage(graphdef, state, k, carry, stats, feature, image, mask, core):
    """Stage k of the up levels on one tile. The stages are cut at the GroupNorms: each normalises
    the carry's last array with the whole image's statistics (`stats`), runs to the next GroupNorm
    and returns the new carry with that norm's input moments over the tile's core. The arithmetic
    mirrors `Decoder.up` and `ResnetBlock`. Stage 0 runs the masked-image branch and also returns
    its features below full resolution, to be passed back as `feature` where they are blended; the
    full-resolution ones (one or two convs from the image) are computed again where needed."""
    decoder = nnx.merge(graphdef, state).decoder
    resnets = [(i, j, r) for i, block in enumerate(decoder.up_blocks) for j, r in enumerate(block.resnets)]

    def blended(x):
        if image is None:
            return x
        level = _blend_level(decoder, k)
        f = feature if feature is not None else decoder.condition_encoder((1 - mask) * image)[::-1][level]
        return blend(x, f, mask)

    if k == 0:  # the mid block's output
        features = [] if image is None else decoder.condition_encoder((1 - mask) * image)[::-1]
        h = carry[0] if image is None else blend(carry[0], features[0], mask)
        kept = {level: f for level, f in enumerate(features) if level and f.shape[1] < image.shape[1]}
        return (h,), _core_moments(resnets[0][2].norm1, h, core), kept
    if k == _num_stages(decoder) - 1:
        return (decoder.conv_out(nnx.silu(_normalize(decoder.conv_norm_out, carry[0], stats))),), None, {}
    i, j, resnet = resnets[(k - 1) // 2]
    if k % 2:  # norm1 .. conv1; the shortcut is taken now, so the carry holds two arrays of one width
        x = carry[0]
        h = resnet.conv1(nnx.silu(_normalize(resnet.norm1, x, stats)))
        residual = x if resnet.conv_shortcut is None else resnet.conv_shortcut(x)
        return (residual, h), _core_moments(resnet.norm2, h, core), {}
    residual, h = carry
    x = residual + resnet.conv2(nnx.silu(_normalize(resnet.norm2, h, stats)))
    block = decoder.up_blocks[i]
    if j + 1 < len(block.resnets):
        return (x,), _core_moments(block.resnets[j + 1].norm1, x, core), {}
    for up in block.upsamplers:
        x = up(x)
    x = blended(x)
    norm = decoder.conv_norm_out if i + 1 == len(decoder.up_blocks) else decoder.up_blocks[i + 1].resnets[0].norm1
    return (x,), _core_moments(norm, x, core), {}


def decode_tiled(vae: AutoencoderKL, z, image=None, mask=None, *, tile: int = 64, overlap: int = 16,
                 progress: bool = False) -> np.ndarray:
    """`decode` with the up levels in overlapping latent tiles of `tile` x `tile`. The mid block (and
    its attention) runs on the whole latent first: it is small; the up levels hold nearly all the
    memory. They run stage by stage (`_tile_stage`) over all tiles, the activations waiting on the
    host, so that every GroupNorm normalises with the statistics of the whole image. Each output
    pixel comes from the tile whose core (`core_bounds`) holds it, at least overlap/2 latent pixels
    from that tile's border: the rest of the tile is context for the convolutions, which see zero
    padding at the border. The result differs from an untiled decode only by what reaches the core
    from there.
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
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    tiles = [(y, x, rows, cols) for y, rows in zip(ys, core_bounds(ys, th, h))
             for x, cols in zip(xs, core_bounds(xs, tw, w))]
    cores = []
    for y, x, (y0, y1), (x0, x1) in tiles:
        cores.append(np.zeros((th, tw), np.float32))
        cores[-1][y0 - y:y1 - y, x0 - x:x1 - x] = 1
    carries = [(mid[:, y:y + th, x:x + tw],) for y, x, _, _ in tiles]
    features = [{} for _ in tiles]  # branch features from stage 0, by level, until blended
    stages = _num_stages(vae.decoder)
    bar = _progress(stages * len(tiles), progress, "tile stages")
    stats = None
    for k in range(stages):
        level, moments = _blend_level(vae.decoder, k), []
        for t, (y, x, _, _) in enumerate(tiles):
            pixels = np.s_[:, y * s:(y + th) * s, x * s:(x + tw) * s]
            cond = (None, None) if image is None else (image[pixels], mask[pixels])
            carry, m, kept = _tile_stage(graphdef, state, k, carries[t], stats, features[t].pop(level, None), *cond,
                                         cores[t])
            # On the host between stages: device memory follows the tile.
            carries[t] = tuple(np.asarray(a) for a in carry)
            features[t].update((lvl, np.asarray(f)) for lvl, f in kept.items())
            moments.append(m)
            bar.update()
        stats = _global_stats(moments) if k + 1 < stages else None
    bar.close()
    out = np.zeros((b, h * s, w * s, vae.config.out_channels), np.float32)
    for (y, x, (y0, y1), (x0, x1)), (tile_out,) in zip(tiles, carries):
        out[:, y0 * s:y1 * s, x0 * s:x1 * s] = tile_out[:, (y0 - y) * s:(y1 - y) * s, (x0 - x) * s:(x1 - x) * s]
    return out


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


def check_output(out, sources, force: bool = False) -> None:
    """An output image never overlaps an input and replaces only an image (unless `force`)."""
    paths.check_destination(out, sources=sources, force=force, what="an image", ours=_is_image)


def _is_image(path) -> bool:
    try:
        with Image.open(paths.path(path).open("rb")) as im:
            return bool(im.format)
    except (OSError, ValueError):
        return False


def reconstruct_file(model, image_path, mask_path, out, *, dtype=jnp.float32, step=None, allow_pickle=False,
                     force=False, **kw) -> list[str]:
    """Writes input | masked input | plain decode | mask-guided decode side by side.
    `model`: a model or anything `load_model` takes, loaded once the inputs have passed their checks."""
    inputs = [p for p in (model, image_path, mask_path) if isinstance(p, (str, os.PathLike))]
    check_output(out, inputs, force)
    image, mask = read_image(image_path), read_mask(mask_path)
    check_pair(image, mask)
    vae = load_model(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
    plain, guided = reconstruct(vae, image, mask, **kw)
    write_image(out, np.concatenate([image, image * (1 - mask), plain, guided], axis=1))
    return [os.fspath(out)]


def decode_file(model, latents_path, image_path, mask_path, out, *, scaled: bool, key=None, dtype=jnp.float32,
                step=None, allow_pickle=False, force=False, **kw) -> list[str]:
    """Decodes every latent in the file against the image and mask; one PNG per latent."""
    inputs = [p for p in (model, latents_path, image_path, mask_path) if isinstance(p, (str, os.PathLike))]
    check_output(out, inputs, force)
    image, mask = read_image(image_path), read_mask(mask_path)
    check_pair(image, mask)
    _existing(latents_path)
    vae = load_model(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
    z = read_latents(latents_path, vae.config.latent_channels, key)
    if scaled:
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    stem, ext = os.path.splitext(os.fspath(out))
    outs = [os.fspath(out)] if len(z) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(z))]
    for path in outs:
        check_output(path, inputs, force)
    for path, y in zip(outs, decode_images(vae, z, image, mask, **kw)):
        write_image(path, y)
    return outs
