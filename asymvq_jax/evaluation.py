"""Evaluation: a fixed set of images and masks through each decoder, plain and mask-guided, measured
with every metric of `metrics`, sharded over all devices and hosts like training."""

import dataclasses
import functools
import heapq
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from asymvq_jax import checkpoint, files, metrics, parallel, paths
from asymvq_jax.data.evalset import eval_batches, folder_images, load_masks, tfds_images
from asymvq_jax.data.folder import BUNDLED_PHOTOS, bundled_photo
from asymvq_jax.models import VAEConfig

MODES = ("plain", "guided")
TABLE_COLUMNS = ("psnr/whole", "psnr/hole", "psnr/known", "ssim/whole", "ssim/hole", "ssim/known",
                 "lpips/whole", "fid/whole", "pre_error")


@dataclasses.dataclass
class Candidate:
    """A whole autoencoder to evaluate, by name: its graph and its states (more than one when training
    splits them)."""
    name: str
    graphdef: object
    states: tuple
    config: VAEConfig

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // 2 ** (len(self.config.up_block_out_channels) - 1)
        return side, side, self.config.latent_channels


def load_candidate(path: str, *, step: int | None = None, allow_pickle: bool = False, family: str | None = None
                   ) -> Candidate:
    """Anything `checkpoint.load` reads, named by its folder or file (`family`: see `load`)."""
    if not paths.exists(path):
        raise FileNotFoundError(f"decoder {path!r} does not exist (a checkpoint file or folder, or a training workdir)")
    vae = checkpoint.load(path, step=step, allow_pickle=allow_pickle, family=family)
    graphdef, state = nnx.split(vae)
    return Candidate(paths.path(path).name, graphdef, (state,), vae.config)


def dataset_images(spec: str, limit: int = 0):
    """`folder:PATH` (or a bare folder), `tfds:NAME/SPLIT[@DATA_DIR]`, or `bundled_photos`."""
    if spec == "bundled_photos":
        return [(name, files.png_bytes(bundled_photo(name))) for name in BUNDLED_PHOTOS][: limit or None]
    if spec.startswith("tfds:"):
        name_split, _, data_dir = spec[5:].partition("@")
        name, _, split = name_split.partition("/")
        return tfds_images(name, split or "validation", data_dir or None, limit=limit)
    path = spec[7:] if spec.startswith("folder:") else spec
    return folder_images(path)[: limit or None]


def read_latents(folder: str, names, decoder: Candidate, shape) -> np.ndarray:
    """Latents made elsewhere (e.g. a diffusers inpainting run), one `NAME.npy` or `NAME.safetensors`
    per image, [1, C, h, w], [C, h, w] or [h, w, C], scaled as diffusion models see them; returned
    unscaled, NHWC."""
    out = []
    for name in names:
        path = next((p for p in (paths.join(folder, name + ext) for ext in (".npy", ".safetensors"))
                     if paths.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"no latents for image {name!r} in {folder} ({name}.npy or {name}.safetensors)")
        z = files.read_latents(path, shape[-1])
        if z.shape[1:] != shape:
            h, w, c = shape
            raise ValueError(f"{path}: latents of shape {z.shape}; the images need ({c}, {h}, {w}) or ({h}, {w}, {c})")
        out.append(decoder.config.unscale(z[0]))
    return np.stack(out)


@functools.lru_cache(maxsize=8)
def make_measure(graphdef, asymmetric: bool, lpips_graphdef=None, inception_graphdef=None):
    """A jitted batch step: the decodes, every per-image metric, and Inception features (kept, so
    evaluating again during training compiles nothing)."""

    def measure(states, lpips_state, inception_state, batch, z):
        vae = nnx.merge(graphdef, *states)
        x, mask = batch["image"], batch["mask"]
        if z is None:
            z = vae.encode(x).mode()
        outs = {"plain": vae.decode(z)}
        if asymmetric:
            outs["guided"] = vae.decode(z, x, mask)
        lpips = nnx.merge(lpips_graphdef, lpips_state) if lpips_graphdef is not None else None
        values = {mode: metrics.per_image(x, y, mask, lpips) for mode, y in outs.items()}
        feats = {}
        if inception_graphdef is not None:
            inception = nnx.merge(inception_graphdef, inception_state)
            feats = {mode: inception(y) for mode, y in {**outs, "real": x}.items()}
        return outs, values, feats

    return jax.jit(measure)


class _Extremes:
    """The k lowest- and highest-scoring examples seen, with their images (host side)."""

    def __init__(self, k: int):
        self.k, self.worst, self.best, self.count = k, [], [], 0

    def offer(self, score: float, name: str, columns) -> None:
        self.count += 1
        item = (score, self.count, name, columns)
        heapq.heappush(self.best, item)
        if len(self.best) > self.k:
            heapq.heappop(self.best)
        heapq.heappush(self.worst, (-score, self.count, name, columns))
        if len(self.worst) > self.k:
            heapq.heappop(self.worst)

    def rows(self, which: str):
        if which == "best":
            return [c for *_, c in sorted(self.best, reverse=True)]
        return [c for *_, c in sorted(self.worst, reverse=True)]


def evaluate(decoders: list[Candidate], images, masks: np.ndarray, *, image_size: int, batch_size: int,
             lpips=None, inception=None, latents: str = "", fid_stats: str = "", save_fid_stats: str = "",
             grids: int = 0, progress: bool = False) -> dict:
    """Every metric of every decoder, plain and guided, averaged over `images` (see module doc).

    Returns {"decoders": {name: {mode: {metric: value}}}, "num_images", "images_per_s" (each image
    through every decoder and metric, from the second batch on: no compiling), ...} and,
    when `grids` > 0, the `grids` worst and best examples per decoder (by whole-image PSNR of the
    guided decode, plain for plain decoders) under "grids".
    """
    decoder_names = [d.name for d in decoders]
    if len(set(decoder_names)) < len(decoder_names):
        raise ValueError(f"decoders need distinct names, got {decoder_names}; rename the folders")
    reference = metrics.load_fid_stats(fid_stats) if fid_stats else None  # a bad file fails before the run
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, devices=mesh.size, hosts=jax.process_count(), what="eval batch size")
    rep = parallel.replicated(mesh)
    lpips_graphdef, lpips_state = nnx.split(lpips) if lpips is not None else (None, None)
    inc_graphdef, inc_state = nnx.split(inception) if inception is not None else (None, None)
    lpips_state, inc_state = jax.device_put((lpips_state, inc_state), rep)
    runs = [(d, make_measure(d.graphdef, d.config.asymmetric, lpips_graphdef, inc_graphdef),
             jax.device_put(d.states, rep)) for d in decoders]

    values = {d.name: {m: [] for m in MODES[: 1 + d.config.asymmetric]} for d in decoders}
    stats = {(d.name, m): metrics.FeatureStats() for d in decoders for m in MODES[: 1 + d.config.asymmetric]}
    stats["real"] = metrics.FeatureStats()
    extremes = {d.name: _Extremes(grids) for d in decoders}
    bar = _progress(len(images), progress)
    n_done, start, warm = 0, time.perf_counter(), None  # throughput counts from the 2nd batch: no compiling
    for batch, names in eval_batches(images, masks, image_size, batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count()):
        global_batch = parallel.global_batch(batch, mesh)
        valid = np.asarray(multihost_utils.process_allgather(global_batch["valid"], tiled=True)) > 0
        for d, measure, states in runs:
            z = None
            if latents:
                mine = names[jax.process_index() * len(batch["valid"]):][: len(batch["valid"])]
                z = parallel.global_batch({"z": read_latents(latents, mine, d, d.latent_shape(image_size))}, mesh)["z"]
            outs, vals, feats = measure(states, lpips_state, inc_state, global_batch, z)
            vals, feats = multihost_utils.process_allgather((vals, feats), tiled=True)
            for mode, per in vals.items():
                values[d.name][mode].append({k: np.asarray(v)[valid] for k, v in per.items()})
            for key, f in feats.items():
                if key == "real":
                    if d is decoders[0]:
                        stats["real"].add(np.asarray(f)[valid])
                else:
                    stats[(d.name, key)].add(np.asarray(f)[valid])
            if grids:
                _offer(extremes[d.name], d, global_batch, outs, vals, valid, names)
        n_done += int(valid.sum())
        if warm is None:
            warm = (n_done, time.perf_counter())
        elif bar is not None:
            bar.set_postfix({"img/s": f"{(n_done - warm[0]) / (time.perf_counter() - warm[1]):.3g}"}, refresh=False)
        if bar is not None:
            bar.update(int(valid.sum()))
    now = time.perf_counter()
    if bar is not None:
        bar.close()
    rate = (n_done - warm[0]) / (now - warm[1]) if n_done > warm[0] else n_done / (now - start)
    results = {"num_images": n_done, "seconds": now - start, "images_per_s": rate, "decoders": {}}
    real = stats["real"].mean_cov() if inception is not None else None
    if save_fid_stats and real is not None and jax.process_index() == 0:
        metrics.save_fid_stats(save_fid_stats, *real)
    if reference is not None:
        real = reference
    for d in decoders:
        results["decoders"][d.name] = {}
        for mode, chunks in values[d.name].items():
            merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            row = metrics.summarize(merged)
            if real is not None:
                row["fid/whole"] = metrics.frechet_distance(*stats[(d.name, mode)].mean_cov(), *real)
            results["decoders"][d.name][mode] = row
    if grids:
        results["grids"] = {d.name: {w: extremes[d.name].rows(w) for w in ("worst", "best")} for d in decoders}
    return results


def _offer(extremes, d, global_batch, outs, vals, valid, names):
    outs, x, mask = multihost_utils.process_allgather((outs, global_batch["image"], global_batch["mask"]), tiled=True)
    if jax.process_index() != 0:
        return
    mode = "guided" if d.config.asymmetric else "plain"
    scores = np.asarray(vals[mode]["psnr/whole"])
    for i in np.flatnonzero(valid):
        masked = x[i] * (1 - mask[i]) - mask[i]  # holes shown black
        extremes.offer(float(scores[i]), names[i], [x[i], masked] + [np.asarray(outs[m][i]) for m in MODES if m in outs])


def _progress(total, enabled):
    if not enabled or jax.process_index() != 0:
        return None
    return tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)


def markdown_table(results: dict) -> str:
    """One row per decoder and mode, one column per metric; pre_error in units of 1e-5 as the paper."""
    header = ["decoder", "mode"] + [("pre_error (1e-5)" if c == "pre_error" else c) for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, modes in results["decoders"].items():
        for mode, row in modes.items():
            cells = []
            for c in TABLE_COLUMNS:
                v = row.get(c)
                cells.append("" if v is None else f"{v * 1e5:.2f}" if c == "pre_error" else f"{v:.4f}")
            lines.append("| " + " | ".join([name, mode] + cells) + " |")
    return "\n".join(lines) + "\n"


OUTPUT_FILES = ("results.json", "results.md", "*_worst.png", "*_best.png")


def write_outputs(results: dict, out_dir: str) -> None:
    """results.json, results.md and worst/best grids (input | masked | plain | guided) per decoder
    (`OUTPUT_FILES`); in an existing folder only these files are replaced."""
    if jax.process_index() != 0:
        return
    grids = results.pop("grids", {})
    with paths.atomic_output(out_dir, is_dir=True) as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown_table(results))
        for name, sets in grids.items():
            for which, rows in sets.items():
                if rows:
                    labels = ("input", "masked input", "plain decode", "guided decode")[:len(rows[0])]
                    columns = {label: np.stack([r[j] for r in rows]) for j, label in enumerate(labels)}
                    files.save_grid(os.path.join(tmp, f"{name}_{which}.png"), columns)
    logging.info("wrote %s", out_dir)


def scalars(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat {"eval/<decoder>/<mode>/<metric>": value} for TensorBoard and JSONL."""
    return {f"{prefix}/{mode}/{k}" if len(results["decoders"]) == 1 else f"{prefix}/{name}/{mode}/{k}": v
            for name, modes in results["decoders"].items() for mode, row in modes.items() for k, v in row.items()}
