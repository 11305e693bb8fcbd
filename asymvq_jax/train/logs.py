"""Where training reports: a progress bar or log lines, TensorBoard events, a JSONL file."""

import dataclasses
import io
import json
import logging
import sys

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from asymvq_jax import parallel, paths
from asymvq_jax.train.state import model_config


def quiet_libraries() -> None:
    """Orbax reports every save step by step through absl's logger at INFO; keep its warnings."""
    logging.getLogger("absl").setLevel(logging.WARNING)


class _ObjectEventWriter:
    """TensorBoard events on gs://, through the path layer: a bucket cannot append, so each flush
    rewrites the whole event file. (tensorboardX's own gs:// writer uploads once more when it is
    garbage-collected after close, which blocks an exit for minutes when the bucket is unreachable.)"""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectEventWriters:
    open = staticmethod(_ObjectEventWriter)

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no folders to create


class MetricWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl` (host 0 only)."""

    def __init__(self, workdir: str, start: int = 0):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter, record_writer  # seconds to import; host 0 only
            record_writer.register_writer_factory("gs", _ObjectEventWriters())
            self.tb = SummaryWriter(paths.join(workdir, "tensorboard"))
            drop_records_after(paths.join(workdir, "metrics.jsonl"), start)
            self.jsonl = paths.LineLog(paths.join(workdir, "metrics.jsonl"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}))

    def image(self, step: int, name: str, png_path: str) -> None:
        """Sends a saved PNG (e.g. the sample grid) to TensorBoard."""
        if self.active:
            self.tb.add_image(name, np.asarray(Image.open(io.BytesIO(paths.read_bytes(png_path))).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.jsonl.close()


def drop_records_after(path: str, step: int) -> None:
    """A run resumed at `step` repeats the steps after it: their records (written before the
    checkpoint a stopped run could not save) go, so that each step appears once."""
    if not paths.exists(path):
        return
    lines = paths.read_text(path).splitlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        paths.write_text(path, "".join(line + "\n" for line in kept))
        logging.info("%s: dropped %d records after step %d, where this run resumes", path, len(lines) - len(kept),
                     step)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short when a run was killed


RUN_SUMMARY = "run_config.json"
# What the train state is made of: a resumed run must build the same.
STATE_FIELDS = ("model", "train_encoder", "ema")


def run_summary(config, mesh, workdir: str, data: str) -> dict:
    """The resolved settings of a run, as it starts (the full config is the one given)."""
    vae = model_config(config)
    return {"workdir": workdir, "model": {"preset": config.model.preset, **dataclasses.asdict(vae)},
            "family": "asymmetric" if vae.asymmetric else "plain", "train_encoder": bool(config.get("train_encoder")),
            "ema": bool(config.ema_decay), "init_from": config.get("init_from") or None, "lr": config.lr,
            "batch_size": config.batch_size, "image_size": config.image_size, "total_steps": config.total_steps,
            "mesh": parallel.describe(mesh), "devices": jax.device_count(), "dtype": config.get("dtype", "float32"),
            "param_dtype": config.get("param_dtype", "float32"), "data": data}


def write_run_summary(workdir: str, run: dict) -> None:
    logging.info("run: %s", ", ".join(f"{k}={v}" for k, v in run.items() if k != "model"))
    logging.info("model: %s", run["model"])
    paths.write_text(paths.join(workdir, RUN_SUMMARY), json.dumps(run, indent=2, default=str) + "\n")


def check_resumable(workdir: str, run: dict) -> None:
    """A resumed run must build the train state its checkpoints hold: say what changed."""
    path = paths.join(workdir, RUN_SUMMARY)
    if not paths.exists(path):
        return
    saved = json.loads(paths.read_text(path))
    changed = [k for k in STATE_FIELDS if k in saved and json.loads(json.dumps(run[k], default=str)) != saved[k]]
    if changed:
        what = "; ".join(f"{k} was {saved[k]} and is now {run[k]}" for k in changed)
        raise ValueError(f"{workdir} holds checkpoints of another train state ({what}): resume with the settings "
                         f"of {path}, or start this run in a new --workdir")


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` steps otherwise."""

    def __init__(self, start: int, total: int, every: int):
        self.every = every
        self.bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            self.bar = tqdm(initial=start, total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, scalars: dict[str, float]) -> None:
        shown = {k: scalars[k] for k in ("loss", "nll", "d_loss", "known_mse", "branch_gap", "img/s")
                 if k in scalars}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.every == 0:
            logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
