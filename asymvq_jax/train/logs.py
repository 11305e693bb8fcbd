"""Where training reports: a progress bar or log lines, TensorBoard events, a JSONL file, PNG grids."""

import json
import logging
import os
import sys

import jax
import numpy as np
from PIL import Image


def quiet_libraries() -> None:
    """Orbax reports every save step by step through absl's logger at INFO; keep its warnings."""
    logging.getLogger("absl").setLevel(logging.WARNING)


class MetricWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl` (host 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, name: str, png_path: str) -> None:
        """Sends a saved PNG (e.g. the sample grid) to TensorBoard."""
        if self.active:
            self.tb.add_image(name, np.asarray(Image.open(png_path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` steps otherwise."""

    def __init__(self, start: int, total: int, every: int):
        self.every = every
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(initial=start, total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, scalars: dict[str, float]) -> None:
        shown = {k: scalars[k] for k in ("loss", "nll", "d_loss", "known_mse", "img/s") if k in scalars}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.every == 0:
            logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def to_uint8(images) -> np.ndarray:
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).round(), np.uint8)


def save_grid(path: str, columns: list) -> None:
    """One row per example; columns are [B, H, W, 3] batches in [-1, 1]."""
    rows = [np.concatenate([to_uint8(col[i]) for col in columns], axis=1) for i in range(len(columns[0]))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
