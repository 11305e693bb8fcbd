"""Decoder training, top to bottom: mesh, models, state, input, step, checkpoints, loop."""

import contextlib
import logging
import signal
import threading
import time

import jax
import numpy as np

from asymvq_jax import checkpoint, parallel, paths
from asymvq_jax.data import held_out_batch, make_train_iterator
from asymvq_jax.evaluate import make_train_evaluator
from asymvq_jax.metrics import pre_error
from asymvq_jax.train import logs
from asymvq_jax.train.state import build, count, model_config
from asymvq_jax.train.step import make_sample_fn, make_train_step

GRID_EXAMPLES = 4


class NonFiniteLossError(FloatingPointError):
    pass


class Preempted:
    """Turns SIGTERM (a TPU preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        in_main_thread = threading.current_thread() is threading.main_thread()
        # Python only lets the main thread install handlers; elsewhere SIGTERM keeps its default.
        self.previous = signal.signal(signal.SIGTERM, self._handle) if in_main_thread else None

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        raise NonFiniteLossError(f"non-finite {', '.join(bad)} at step {step}; the state was not updated "
                                 "and the last good checkpoint is kept")


def train(config, workdir: str) -> dict[str, float]:
    """Trains until `config.total_steps` (resuming from `workdir`); returns the last metrics."""
    with contextlib.ExitStack() as cleanup:
        return _train(config, workdir, cleanup)


def _train(config, workdir, cleanup) -> dict[str, float]:
    # ---- workdir and mesh
    paths.makedirs(workdir)
    logs.quiet_libraries()
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    rep = parallel.replicated(mesh)

    # ---- input first: a missing or empty dataset fails before anything is built
    mgr = checkpoint.manager(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    cleanup.callback(mgr.close)
    cleanup.callback(mgr.wait_until_finished)  # runs first: a pending async save completes
    start = mgr.latest_step() or 0
    data = cleanup.enter_context(make_train_iterator(config, start_step=start))

    # ---- models, optimizers, train state; resumed if the workdir has a checkpoint
    graphdefs, state, consts, tx, disc_tx = build(config)
    logging.info("model %s: %.2fM parameters trained, %.2fM frozen; discriminator %.2fM", config.model.preset,
                 count(state["params"]) / 1e6, count(consts["frozen"]) / 1e6,
                 count(state["disc"]["params"]) / 1e6)
    checkpoint.write_model_config(workdir, model_config(config))
    state, consts = jax.device_put((state, consts), rep)
    if start:
        restored = checkpoint.restore(mgr, {"train": state, "frozen": consts["frozen"]}, start)
        state, consts["frozen"] = restored["train"], restored["frozen"]
        logging.info("resumed from %s at step %d", workdir, start)

    # ---- the jitted step (state donated: it is replaced every step)
    step_fn = jax.jit(make_train_step(config, graphdefs, tx, disc_tx),
                      in_shardings=(rep, rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep),
                      donate_argnums=0)
    sample_fn = jax.jit(make_sample_fn(graphdefs))
    evaluate_now = config.get("eval_every") and config.eval_every <= config.total_steps
    evaluator = make_train_evaluator(config, graphdefs) if evaluate_now else None
    grid = held_out_batch(config, GRID_EXAMPLES)
    grid_images, grid_masks = grid["image"], grid["mask"]

    # ---- loop
    writer = logs.MetricWriter(workdir)
    cleanup.callback(writer.close)
    progress = logs.Progress(start, config.total_steps, config.log_every)
    cleanup.callback(progress.close)
    preempted = Preempted()
    cleanup.callback(preempted.restore)
    last, pending, clock = {}, None, time.perf_counter()

    def flush():
        nonlocal pending, last, clock
        if pending is not None:
            step, metrics = pending
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(step, scalars)
            now = time.perf_counter()
            scalars["img/s"] = config.batch_size / max(now - clock, 1e-9)
            clock, pending, last = now, None, scalars
            if step % config.log_every == 0 or step == config.total_steps:
                writer.write(step, scalars)
            progress.update(step, scalars)

    for step in range(start + 1, config.total_steps + 1):
        state, metrics = step_fn(state, consts, parallel.global_batch(next(data), mesh))
        flush()  # the previous step's metrics, read while this step runs
        pending = (step, metrics)
        stop = preempted.requested
        if stop or mgr.should_save(step) or step == config.total_steps or step % config.sample_every == 0:
            flush()  # never save or show a step whose losses were not checked
        if step % config.sample_every == 0 or step == config.total_steps:
            writer.write(step, write_samples(workdir, step, sample_fn, state, consts, grid_images, grid_masks))
            writer.image(step, "samples", sample_path(workdir, step))
        if evaluator is not None and step % config.eval_every == 0:
            writer.write(step, evaluator(state.get("ema", state["params"]), consts))
        checkpoint.save(mgr, step, {"train": state, "frozen": consts["frozen"]},
                        force=stop or step == config.total_steps)
        if stop:
            break
    flush()
    return last


def sample_path(workdir: str, step: int) -> str:
    return paths.join(workdir, "samples", f"step_{step:07d}.png")


def write_samples(workdir, step, sample_fn, state, consts, images, masks) -> dict[str, float]:
    """Saves a labelled grid of held-out photos (host 0) and returns the squared error of the
    plain and (asymmetric decoders) the mask-guided decode on the known region and in the hole."""
    params = state.get("ema", state["params"])
    plain, guided = jax.device_get(sample_fn(params, consts, images, masks))
    decodes = {"plain": plain, "guided": guided} if "condition_encoder" in params["decoder"] else {"plain": plain}
    if jax.process_index() == 0:
        masked = images * (1 - masks) + masks * -1.0  # holes shown black
        columns = ({"input": images, "masked input": masked, "plain decode": plain, "guided decode": guided}
                   if len(decodes) == 2 else {"input": images, "reconstruction": plain})
        logs.save_grid(sample_path(workdir, step), columns)
    # pre_error over the known region (mask 0); over the hole with the mask inverted.
    return {f"samples/{region}_mse_{name}": float(np.mean(pre_error(images, out, hole)))
            for name, out in decodes.items() for region, hole in (("known", masks), ("hole", 1 - masks))}
