"""Inference for users: jitted encode and decode, images and masks from files, tiled decoding.

The jitted functions take the model split into a graph (static) and its state, so XLA compiles
once per model structure, input shape and dtype, and every later call of that shape reuses it.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from asymvq_jax import paths
from asymvq_jax.checkpoint import load
from asymvq_jax.files import existing, is_image, read_image, read_latents, read_mask, write_image
from asymvq_jax.models import AutoencoderKL
from asymvq_jax.models.blocks import group_norm_with, own_statistics


# -- the model ---------------------------------------------------------------------------------

def compute_dtype(vae: AutoencoderKL):
    return jnp.dtype(vae.compute_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
    return nnx.merge(graphdef, state).encode(x).mode()


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z, image, mask):
    return nnx.merge(graphdef, state).decode(z, image, mask)


@functools.partial(jax.jit, static_argnums=0)
def _decode_mid(graphdef, state, z):
    vae = nnx.merge(graphdef, state)
    return vae.decoder.mid(vae.post_quant(z))


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


def _core_moments(groups: int, x, core):
    """(count, mean, sum of squared deviations) per example and group of x over the tile's core
    (`core`: 1 inside, 0 outside, at latent resolution), in float32 as GroupNorm computes them."""
    f = x.shape[1] // core.shape[0]
    inside = jnp.repeat(jnp.repeat(core, f, 0), f, 1)[None, :, :, None, None]
    g = x.astype(jnp.float32).reshape(*x.shape[:3], groups, -1)
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


def _normalizer(stats):
    return own_statistics if stats is None else lambda norm, x: group_norm_with(norm, x, *stats)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _tile_segment(run, graphdef, groups, state, carry, stats, cond, mask, core):
    """One decoder segment (`Decoder.segments`) on one tile, its GroupNorm given the whole image's
    statistics; returns the new carry and the moments of its last array (the next norm's input) over
    the tile's core. Jit keys on the segment's kind and structure, so like segments share a program."""
    carry = run(nnx.merge(graphdef, state), carry, _normalizer(stats), cond, mask)
    return carry, _core_moments(groups, carry[-1] if isinstance(carry, tuple) else carry, core)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tile_output(run, graphdef, state, carry, stats):
    """The last segment (the output norm, which blends nothing) and conv_out on one tile: the image."""
    segment_modules, conv_out = nnx.merge(graphdef, state)
    return conv_out(run(segment_modules, carry, _normalizer(stats), None, None))


@functools.partial(jax.jit, static_argnums=0)
def _branch_features(graphdef, state, image, mask):
    return nnx.merge(graphdef, state).branch_features(image, mask)


def decode_tiled(vae: AutoencoderKL, z, image=None, mask=None, *, tile: int = 64, overlap: int = 16,
                 progress: bool = False) -> np.ndarray:
    """`decode` with the up levels in overlapping latent tiles of `tile` x `tile`. The mid block (and
    its attention) runs on the whole latent first: it is small; the up levels hold nearly all the
    memory. They run segment by segment (`Decoder.segments`) over all tiles, the activations waiting
    on the host, so that every GroupNorm normalises with the statistics of the whole image. Each
    output pixel comes from the tile whose core (`core_bounds`) holds it, at least overlap/2 latent
    pixels from that tile's border: the rest of the tile is context for the convolutions, which see
    zero padding at the border. The result differs from an untiled decode only by what reaches the
    core from there.
    """
    if overlap <= 0 or overlap * 2 > tile:
        raise ValueError(f"tile overlap must be in [1, tile/2]; got tile={tile}, overlap={overlap}")
    dtype = compute_dtype(vae)
    z = jnp.asarray(z, dtype)
    if image is not None or mask is not None:
        image, mask = (np.asarray(a) for a in vae._check_condition(z, jnp.asarray(image, dtype),
                                                                   jnp.asarray(mask, dtype)))
    mid = np.asarray(_decode_mid(*nnx.split(vae), z))
    tiles, s = _tiles(z.shape[1], z.shape[2], tile, overlap), vae.downscale
    carries = [mid[:, t.y:t.y + t.core.shape[0], t.x:t.x + t.core.shape[1]] for t in tiles]
    kept = [{} for _ in tiles]  # each tile's branch features below full resolution, by level, until blended
    decoder, (*segments, last) = nnx.split(vae.decoder), vae.decoder.segments()
    bar = _progress((len(segments) + 1) * len(tiles), progress, "tile segments")
    stats = None
    for segment in segments:
        graphdef, state = nnx.split(segment.modules)
        moments = []
        for i, t in enumerate(tiles):
            cond = tile_mask = None
            if image is not None and segment.level is not None:
                pixels = np.s_[:, t.y * s:(t.y + t.core.shape[0]) * s, t.x * s:(t.x + t.core.shape[1]) * s]
                tile_mask = mask[pixels]
                cond = _feature(decoder, kept[i], segment.level, image[pixels], tile_mask)
            carry, m = _tile_segment(segment.run, graphdef, vae.config.norm_num_groups, state, carries[i], stats,
                                     cond, tile_mask, t.core)
            carries[i] = jax.tree.map(np.asarray, carry)  # on the host between segments: device memory follows the tile
            moments.append(m)
            bar.update()
        stats = _global_stats(moments)
    output = nnx.split((last.modules, vae.decoder.conv_out))
    out = np.zeros((z.shape[0], z.shape[1] * s, z.shape[2] * s, vae.config.out_channels), np.float32)
    for t, carry in zip(tiles, carries):
        (y0, y1), (x0, x1) = t.rows, t.cols
        tile_out = np.asarray(_tile_output(last.run, *output, carry, stats))
        out[:, y0 * s:y1 * s, x0 * s:x1 * s] = tile_out[:, (y0 - t.y) * s:(y1 - t.y) * s, (x0 - t.x) * s:(x1 - t.x) * s]
        bar.update()
    bar.close()
    return out


class _Tile(NamedTuple):
    y: int  # where the tile starts, in latent pixels
    x: int
    rows: tuple[int, int]  # its core, the part of the output it gives
    cols: tuple[int, int]
    core: np.ndarray  # [tile h, tile w]: 1 in the core, 0 in the context around it


def _tiles(h: int, w: int, tile: int, overlap: int) -> list[_Tile]:
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    tiles = []
    for y, (y0, y1) in zip(ys, core_bounds(ys, th, h)):
        for x, (x0, x1) in zip(xs, core_bounds(xs, tw, w)):
            core = np.zeros((th, tw), np.float32)
            core[y0 - y:y1 - y, x0 - x:x1 - x] = 1
            tiles.append(_Tile(y, x, (y0, y1), (x0, x1), core))
    return tiles


def _feature(decoder, kept: dict, level: int, image, mask):
    """One tile's branch feature at `level`: kept from its first blend if below full resolution, else
    computed (again, at full resolution: one or two convs from the image)."""
    if level in kept:
        return kept.pop(level)
    features = _branch_features(*decoder, image, mask)
    kept |= {k: np.asarray(f) for k, f in enumerate(features) if k > level and f.shape[1] < image.shape[1]}
    return features[level]


def _progress(total: int, enabled: bool, unit: str):
    return tqdm(total=total, disable=not enabled or total <= 1, unit=unit, leave=False)


# -- whole images of any size ------------------------------------------------------------------

def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Mirrors [H, W, C] past the bottom and right edges so H and W are multiples of `multiple`."""
    h, w = x.shape[:2]
    pads = [(0, -h % multiple), (0, -w % multiple), (0, 0)]
    return np.pad(x, pads, mode="reflect" if min(h, w) > multiple else "edge")


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

def check_output(out, sources, force: bool = False) -> None:
    """An output image never overlaps an input and replaces only an image (unless `force`)."""
    paths.check_destination(out, sources=sources, force=force, what="an image", ours=is_image)


def reconstruct_file(model, image_path, mask_path, out, *, dtype=jnp.float32, step=None, allow_pickle=False,
                     force=False, **kw) -> list[str]:
    """Writes input | masked input | plain decode | mask-guided decode side by side.
    `model`: anything `load` takes, loaded once the inputs have passed their checks."""
    inputs = [p for p in (model, image_path, mask_path) if isinstance(p, (str, os.PathLike))]
    check_output(out, inputs, force)
    image, mask = read_image(image_path), read_mask(mask_path)
    check_pair(image, mask)
    vae = load(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
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
    existing(latents_path)
    vae = load(model, dtype=dtype, step=step, allow_pickle=allow_pickle)
    z = read_latents(latents_path, vae.config.latent_channels, key, image_size=image.shape[:2])
    if scaled:
        z = vae.config.unscale(z)
    out = os.fspath(out)
    stem, dot, ext = out.rpartition(".") if "." in paths.path(out).name else (out, "", "")
    outs = [out] if len(z) == 1 else [f"{stem}_{i}{dot + ext or '.png'}" for i in range(len(z))]
    for path in outs:
        check_output(path, inputs, force)
    for path, y in zip(outs, decode_images(vae, z, image, mask, **kw)):
        write_image(path, y)
    return outs
