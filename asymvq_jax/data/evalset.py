"""Evaluation input: fixed mask sets and a finite, deterministic iterator of (image, mask) batches.

The mask sets (LaMa's thin / medium / thick at 256 and 512) were drawn once from seed 0 with
`masks.lama_mask` and ship as PNGs, so numbers compare across runs, machines and PIL versions.
Image i of a dataset gets mask i modulo the size of the set. As LaMa's evaluation sets do, a
mask with more than half the image as hole (or none) is drawn again.
"""

import argparse
import io
import os

import numpy as np
from PIL import Image

from asymvq_jax import paths
from asymvq_jax.parallel import check_batch_size
from asymvq_jax.data.folder import BadImageError, decode_rgb, list_images
from asymvq_jax.data.masks import MASK_VARIANTS, Stream, example_rng, lama_mask
from asymvq_jax.data.tfds import _open_builder, import_tfds

MASK_SETS = tuple(MASK_VARIANTS)
MASKS_DIR = os.path.join(os.path.dirname(__file__), "eval_masks")
MASKS_PER_SET, MASK_SEED, MAX_HOLE = 200, 0, 0.5


def draw_mask_set(name: str, n: int = MASKS_PER_SET, seed: int = MASK_SEED, size: int = 0) -> np.ndarray:
    """n masks [n, S, S] uint8 {0, 1} of variant `name` (S: `size`, default the variant's own),
    each 0 < hole <= 50%."""
    size, k = size or MASK_VARIANTS[name].base_size, MASK_SETS.index(name)
    out = []
    for i in range(n):
        for attempt in range(1000):
            m = lama_mask(example_rng(seed, Stream.EVAL_MASK, k, i, attempt), size, size, name)[..., 0]
            if 0 < m.mean() <= MAX_HOLE:
                break
        out.append(m.astype(np.uint8))
    return np.stack(out)


def write_mask_sets(dst: str = MASKS_DIR, n: int = MASKS_PER_SET, seed: int = MASK_SEED) -> None:
    for name in MASK_SETS:
        for i, m in enumerate(draw_mask_set(name, n, seed)):
            png = io.BytesIO()
            Image.fromarray(m * 255).save(png, format="PNG", optimize=True)
            paths.write_bytes(paths.join(dst, name, f"{i:04d}.png"), png.getvalue())


def load_masks(source: str, size: int, count: int = MASKS_PER_SET) -> np.ndarray:
    """A mask set by name (`MASK_SETS`) or a folder of mask images (white = hole, thresholded at
    half as LaMa does) -> float32 [N, size, size, 1]. Masks of another size are an error, but a
    named set at a size other than its own (small images during training) is drawn again there
    (its first `count` masks)."""
    if source in MASK_SETS and size != MASK_VARIANTS[source].base_size:
        return draw_mask_set(source, min(count, MASKS_PER_SET), size=size).astype(np.float32)[..., None]
    folder = paths.join(MASKS_DIR, source) if source in MASK_SETS else source
    if not paths.isdir(folder):
        raise FileNotFoundError(f"mask set {source!r}: neither a known set {MASK_SETS} nor a folder")
    masks = []
    for path in list_images(folder):
        with Image.open(io.BytesIO(paths.read_bytes(path))) as im:
            m = np.asarray(im.convert("L"), np.float32) / 255.0
        if m.shape != (size, size):
            raise ValueError(f"mask {path} is {m.shape[1]}x{m.shape[0]}, the images are {size}x{size}; "
                             f"use a mask set of that size (e.g. thick_{size} where one exists)")
        masks.append((m >= 0.5).astype(np.float32)[..., None])
    return np.stack(masks)


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """The central square, resized to `size` (area interpolation when shrinking), in [-1, 1]."""
    h, w = img.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[y0:y0 + side, x0:x0 + side])
    if side != size:
        crop = crop.resize((size, size), Image.BILINEAR if side < size else Image.BOX)
    return np.asarray(crop, np.float32) / 127.5 - 1.0


def folder_images(path: str):
    """(name, encoded source) of every image of a folder, in sorted order; the name is the file's
    path under the folder, without its extension."""
    root = paths.join(path)  # as `list_images` spells the files: absolute, or a URL
    return [(p[len(root):].lstrip("/").rsplit(".", 1)[0], p) for p in list_images(path)]


def tfds_images(name: str, split: str, data_dir: str | None, image_key: str = "image", limit: int = 0):
    """(name, encoded bytes) of a TFDS split, in the split's stored order."""
    _, tfds = import_tfds()
    builder = _open_builder(name, data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (available: {list(builder.info.splits)})")
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
    if limit:
        ds = ds.take(limit)
    return [(f"{split}_{i:06d}", bytes(ex[image_key])) for i, ex in enumerate(ds.as_numpy_iterator())]


def eval_batches(images, masks: np.ndarray, size: int, batch_size: int, *, limit: int = 0,
                 process_index: int = 0, process_count: int = 1):
    """Yields this host's part of each global batch, {"image", "mask", "valid"}, and the names of
    the whole global batch.

    Finite and in a fixed order. The last batch is filled up by repeating its first image with
    valid = 0, so every batch splits evenly over the devices; metrics drop the filler.
    """
    images = images[:limit] if limit else images
    if not images:
        raise ValueError("the evaluation dataset has no images")
    check_batch_size(batch_size, hosts=process_count, what="eval batch size")
    per_host = batch_size // process_count
    for start in range(0, len(images), batch_size):
        idx = list(range(start, min(start + batch_size, len(images))))
        valid = [1.0] * len(idx) + [0.0] * (batch_size - len(idx))
        idx += [idx[0]] * (batch_size - len(idx))
        mine = slice(process_index * per_host, (process_index + 1) * per_host)
        batch = {"image": [], "mask": [], "valid": np.asarray(valid[mine], np.float32)}
        for i in idx[mine]:
            name, src = images[i]
            try:
                batch["image"].append(center_crop_resize(decode_rgb(src)[0], size))
            except BadImageError as e:
                raise BadImageError(f"evaluation image {name}: {e}") from e
            batch["mask"].append(masks[i % len(masks)])
        yield {k: np.stack(v) if isinstance(v, list) else v for k, v in batch.items()}, [images[i][0] for i in idx]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Draw the fixed evaluation mask sets again (as shipped).")
    parser.add_argument("--out", default=MASKS_DIR)
    parser.add_argument("--n", type=int, default=MASKS_PER_SET)
    parser.add_argument("--seed", type=int, default=MASK_SEED)
    args = parser.parse_args(argv)
    write_mask_sets(args.out, args.n, args.seed)


if __name__ == "__main__":
    main()
