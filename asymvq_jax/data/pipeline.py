"""The training input: images and inpainting masks, a pure function of the step.

The batch of step s on host p depends only on (config.seed, s, p), the dataset and the host
count, never on what was read before: a run resumed at step k sees the batches an uninterrupted
run sees from k on. Global example j of a step belongs to host j // (batch_size / hosts), so the
hosts read disjoint parts of every batch. Folders and array_record TFDS are read by index: global
example g = s * batch_size + j lies in epoch g // N, a permutation of the N files seeded by
(seed, epoch), so an epoch visits every file once; streaming TFDS is in `tfds`. Crops and masks
come from `example_rng(seed, Stream..., s, j)`.

Augmentation is a random square crop (side U(0.5, 1) of the short side) resized to image_size,
by area when shrinking and bilinear when enlarging, as OpenCV's INTER_AREA does; no flip unless
`data.flips` asks for one (not the authors': "h" a mirror, "dihedral" also rotations by 90 degrees), and
no colour change unless `data.colour_gain` asks for one (not the authors' either). Small
images are upsampled and still used. Odd modes (grey, palette, CMYK, alpha, 16-bit) are
converted; a corrupt file is skipped with a warning and the example takes another, chosen by a
seeded retry; a missing or empty source fails at start-up. `TrainIterator.stats` counts each.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
from collections import OrderedDict
from typing import Any

import jax
import numpy as np
from PIL import Image

from asymvq_jax.data.folder import HELD_OUT_PHOTOS, TRAIN_PHOTOS, BadImageError, bundled_photo, decode_rgb, list_images
from asymvq_jax.data.masks import Stream, example_rng, lama_mask, training_mask
from asymvq_jax.data.tfds import TfdsSource
from asymvq_jax.parallel import check_batch_size

log = logging.getLogger(__name__)

_MAX_RETRIES = 64


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        v = cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)
    except (KeyError, AttributeError):
        return default
    return default if v is None else v


# ----------------------------------------------------------------------------- sources
class FolderSource:
    """All images under a folder, random access by index (sorted paths)."""

    random_access = True

    def __init__(self, path: str):
        self.paths = list_images(path)
        self.desc = f"folder:{path}"
        self._check_readable()

    def _check_readable(self) -> None:
        """Fails at start-up, not once the model is built, if no image among the first ones decodes."""
        errors = []
        for p in self.paths[:_MAX_RETRIES]:
            try:
                decode_rgb(p)
                return
            except BadImageError as e:
                errors.append(f"{p}: {e}")
        raise ValueError(f"{self.desc}: none of the first {len(errors)} images can be read (e.g. {errors[0]})")

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> tuple[str, str]:
        p = self.paths[int(i)]
        return p, p


class BundledPhotos:
    """The declared training photos of scikit-image, decoded once and held in memory."""

    random_access = True
    desc = "bundled_photos"

    def __init__(self, names: tuple[str, ...] = TRAIN_PHOTOS):
        self.names, self.images = names, [bundled_photo(n) for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, i: int) -> tuple[np.ndarray, str]:
        return self.images[int(i)], self.names[int(i)]


def make_source(config, *, process_index: int, process_count: int):
    data = config.data
    kind = _get(data, "source", "folder")
    if kind == "folder":
        path = _get(data, "path")
        if not path:
            raise ValueError("config.data.path must name an image folder (source='folder')")
        return FolderSource(str(path))
    if kind == "bundled_photos":
        return BundledPhotos()
    if kind == "tfds":
        name = _get(data, "name")
        if not name:
            raise ValueError("config.data.name must name a TFDS dataset (source='tfds')")
        return TfdsSource(
            name,
            _get(data, "split", "train"),
            _get(data, "data_dir"),
            seed=int(config.seed),
            process_index=process_index,
            process_count=process_count,
            image_key=_get(data, "image_key", "image"),
            shuffle_buffer=int(_get(data, "shuffle_buffer", 10_000)),
        )
    raise ValueError(f"config.data.source must be 'folder', 'tfds' or 'bundled_photos', got {kind!r}")


# ------------------------------------------------------------------------ augmentation
def random_crop_resize(
    img: np.ndarray, rng: np.random.Generator, size: int, min_frac: float = 0.5,
    max_frac: float = 1.0,
) -> tuple[np.ndarray, bool]:
    """Random square crop (side U(min,max) x short side) resized to `size`.

    `img`: uint8 [H, W, 3]. Returns (float32 [size, size, 3] in [-1, 1], upsampled).
    """
    h, w = img.shape[:2]
    short = min(h, w)
    side = int(np.clip(round(rng.uniform(min_frac, max_frac) * short), 1, short))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side])
    upsampled = side < size
    if side != size:
        crop = crop.resize((size, size), Image.BILINEAR if upsampled else Image.BOX)
    out = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return out, upsampled


FLIPS = ("none", "h", "dihedral")


def random_flip(img: np.ndarray, rng: np.random.Generator, flips: str) -> np.ndarray:
    """`img` mirrored left-right with probability 1/2 ("h"), or moved by one of the square's 8
    symmetries ("dihedral": the mirror, then 0-3 quarter turns); "none" returns it as it is."""
    if flips == "none":
        return img
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if flips == "dihedral":
        img = np.rot90(img, int(rng.integers(4)))
    return np.ascontiguousarray(img)


def random_colour_gain(img: np.ndarray, rng: np.random.Generator, gain: float) -> np.ndarray:
    """`img` ([-1, 1]) with each RGB channel's brightness, on the [0, 1] scale, times its own
    U(1 - gain, 1 + gain), clipped back to [-1, 1]; gain 0 returns it as it is. Few training
    photos hold few colours: the gains show the decoder more of them."""
    if gain == 0.0:
        return img
    g = rng.uniform(1.0 - gain, 1.0 + gain, size=3).astype(np.float32)
    return np.clip((img + 1.0) * g - 1.0, -1.0, 1.0)


# ---------------------------------------------------------------------------- iterator
class TrainIterator:
    """Endless per-host batches; see the module docstring. Use as an iterator."""

    def __init__(
        self,
        source,
        *,
        seed: int,
        global_batch: int,
        image_size: int,
        mask_variant: str = "thick_256",
        all_ones_prob: float = 0.5,
        flips: str = "none",
        colour_gain: float = 0.0,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int | None = None,
        prefetch: int = 2,
        background: bool = True,
    ):
        if seed < 0:
            raise ValueError(f"config.seed must be >= 0, got {seed}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index} / count={process_count}")
        check_batch_size(global_batch, hosts=process_count)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.source = source
        self.seed, self.global_batch, self.image_size = int(seed), global_batch, image_size
        self.per_host = global_batch // process_count
        self.mask_variant, self.all_ones_prob = mask_variant, float(all_ones_prob)
        if flips not in FLIPS:
            raise ValueError(f"config.data.flips must be one of {FLIPS}, got {flips!r}")
        self.flips = flips
        if not 0.0 <= colour_gain < 1.0:
            raise ValueError(f"config.data.colour_gain must be in [0, 1), got {colour_gain}")
        self.colour_gain = float(colour_gain)
        self.process_index, self.process_count = process_index, process_count
        self.step = int(start_step)  # step of the next batch returned
        self.stats = {"skipped": 0, "converted": 0, "upsampled": 0}
        self._seen: dict[str, set] = {k: set() for k in self.stats}
        self._bad: set[str] = set()
        self._lock = threading.Lock()
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._stream = None
        if not source.random_access:
            self._stream = source.stream(self.step * self.per_host)
        n = num_workers or min(8, os.cpu_count() or 1)
        self._pool = cf.ThreadPoolExecutor(n, thread_name_prefix="asymvq-decode")
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, prefetch))
            self._thread = threading.Thread(
                target=self._producer, name="asymvq-data", daemon=True
            )
            self._thread.start()

    # -- bookkeeping --------------------------------------------------------------
    def _count(self, key: str, name: str) -> int | None:
        with self._lock:
            if name in self._seen[key]:
                return None
            self._seen[key].add(name)
            self.stats[key] += 1
            return self.stats[key]

    def _decode(self, payload, name: str) -> np.ndarray | None:
        if name in self._bad:
            return None
        if isinstance(payload, np.ndarray):  # already decoded (bundled photos)
            return payload
        try:
            arr, note = decode_rgb(payload)
        except BadImageError as e:
            with self._lock:
                self._bad.add(name)
            n = self._count("skipped", name)
            if n is not None:
                log.warning("skipping unreadable image %s (%s); %d skipped so far", name, e, n)
            return None
        if note is not None:
            n = self._count("converted", name)
            if n is not None:
                log.info("converted image %s (%s); %d converted so far", name, note, n)
        return arr

    def _finish(self, arr: np.ndarray, name: str, step: int, j: int):
        img, up = random_crop_resize(
            arr, example_rng(self.seed, Stream.CROP, step, j), self.image_size
        )
        augment = example_rng(self.seed, Stream.AUGMENT, step, j)
        img = random_colour_gain(random_flip(img, augment, self.flips), augment, self.colour_gain)
        if up:
            n = self._count("upsampled", name)
            if n is not None:
                log.info("upsampled image %s (%dx%d, cropped smaller than %d px); %d upsampled so far",
                         name, arr.shape[1], arr.shape[0], self.image_size, n)
        s = self.image_size
        mask = training_mask(
            example_rng(self.seed, Stream.MASK, step, j), s, s, self.mask_variant,
            self.all_ones_prob,
        )
        return img, mask

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            p = self._perms.get(epoch)
            if p is None:
                p = example_rng(self.seed, Stream.PERM, epoch).permutation(len(self.source))
                self._perms[epoch] = p
                while len(self._perms) > 2:
                    self._perms.popitem(last=False)
            return p

    # -- one example / one batch ---------------------------------------------------
    def _random_access_example(self, step: int, j: int):
        n = len(self.source)
        g = step * self.global_batch + j
        epoch, pos = divmod(g, n)
        idx = int(self._perm(epoch)[pos])
        for attempt in range(_MAX_RETRIES):
            payload, name = self.source.get(idx)
            arr = self._decode(payload, name)
            if arr is not None:
                return self._finish(arr, name, step, j)
            idx = int(example_rng(self.seed, Stream.RETRY, step, j, attempt).integers(n))
        raise RuntimeError(
            f"{self.source.desc}: {_MAX_RETRIES} unreadable images in a row "
            f"({self.stats['skipped']} skipped so far); is the dataset corrupt?"
        )

    def _make_batch(self, step: int) -> dict[str, np.ndarray]:
        base = self.process_index * self.per_host
        js = range(base, base + self.per_host)
        if self.source.random_access:
            results = list(self._pool.map(lambda j: self._random_access_example(step, j), js))
        else:
            records = [next(self._stream) for _ in js]
            arrs = list(self._pool.map(lambda r: self._decode(*r), records))
            good = [i for i, a in enumerate(arrs) if a is not None]
            if not good:
                raise RuntimeError(
                    f"{self.source.desc}: a whole batch of unreadable images at step {step}"
                )
            picks = []
            for i in range(len(records)):  # bad record -> next good one of the batch
                k = next(k for k in good + [g + len(records) for g in good] if k >= i)
                picks.append(k % len(records))
            results = list(
                self._pool.map(
                    lambda ij: self._finish(arrs[ij[1]], records[ij[1]][1], step, js[ij[0]]),
                    enumerate(picks),
                )
            )
        return {
            "image": np.stack([r[0] for r in results]),
            "mask": np.stack([r[1] for r in results]),
        }

    # -- iteration -----------------------------------------------------------------
    def _producer(self):
        step = self.step
        while not self._stop.is_set():
            try:
                item = (step, self._make_batch(step), None)
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        if self._queue is None:
            batch = self._make_batch(self.step)
        else:
            step, batch, err = self._queue.get()
            if err is not None:
                self.close()
                raise err
            assert step == self.step
        self.step += 1
        return batch

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _process_info(process_index, process_count):
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def make_train_iterator(
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    background: bool = True,
    source=None,
) -> TrainIterator:
    """Endless per-host training batches starting at `start_step` (module docstring), from `source`
    (default: `make_source(config, ...)`)."""
    process_index, process_count = _process_info(process_index, process_count)
    if source is None:
        source = make_source(config, process_index=process_index, process_count=process_count)
    data = config.data
    return TrainIterator(
        source,
        seed=int(config.seed),
        global_batch=int(config.batch_size),
        image_size=int(config.image_size),
        mask_variant=str(_get(data, "mask", "thick_256")),
        all_ones_prob=float(_get(data, "all_ones_prob", 0.5)),
        flips=str(_get(data, "flips", "none")),
        colour_gain=float(_get(data, "colour_gain", 0.0)),
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        num_workers=_get(data, "num_workers"),
        prefetch=int(_get(data, "prefetch", 2)),
        background=background,
    )


def held_out_batch(config, n: int) -> dict[str, np.ndarray]:
    """`n` fixed examples of the held-out photos (cycled, each with its own crop) with LaMa
    masks that are never all-ones: the same for every run with the same seed and size."""
    size, seed = int(config.image_size), int(config.seed)
    images, masks = [], []
    for i in range(n):
        photo = bundled_photo(HELD_OUT_PHOTOS[i % len(HELD_OUT_PHOTOS)])
        images.append(random_crop_resize(photo, example_rng(seed, Stream.HELD_OUT_CROP, i), size)[0])
        masks.append(lama_mask(example_rng(seed, Stream.HELD_OUT_MASK, i), size, size,
                               str(_get(config.data, "mask", "thick_256"))))
    return {"image": np.stack(images), "mask": np.stack(masks).reshape(n, size, size, 1).astype(np.float32)}


def batch_for_step(
    config, step: int, *, process_index: int | None = None, process_count: int | None = None
) -> dict[str, np.ndarray]:
    """The batch `make_train_iterator(config, start_step=step)` yields first."""
    it = make_train_iterator(
        config, start_step=step, process_index=process_index,
        process_count=process_count, background=False,
    )
    try:
        return next(it)
    finally:
        it.close()
