"""Decoder training, top to bottom: mesh, models, state, input, step, checkpoints, loop."""

import contextlib
import logging
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from asymvq_jax import checkpoint, files, parallel, paths
from asymvq_jax.data import held_out_batch, make_source, make_train_iterator
from asymvq_jax.metrics import pre_error
from asymvq_jax.train import factors, logs
from asymvq_jax.train.config import derived
from asymvq_jax.train.evaluator import make_evaluator
from asymvq_jax.train.state import build, count, model_config
from asymvq_jax.train.step import make_sample_fn, make_train_step

GRID_EXAMPLES = 4


class NonFiniteLossError(FloatingPointError):
    pass


class Preempted:
    """SIGTERM (a TPU preemption) as a stop the loop checks between steps. With several hosts,
    jax's preemption service catches the signal on any of them and all agree on one step."""

    def __init__(self):
        self.requested, self.previous = False, None
        self.multihost = jax.process_count() > 1
        # Python only lets the main thread install handlers; elsewhere SIGTERM keeps its default.
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __call__(self, step: int) -> bool:
        """Whether to save and stop after `step`; every host must ask at every step."""
        if self.multihost:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

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
        return _train(derived(config), workdir, cleanup)


def _train(config, workdir, cleanup) -> dict[str, float]:
    # ---- hosts and mesh
    parallel.initialize(config)
    logs.quiet_libraries()
    mesh = parallel.make_mesh(config.get("mesh"))
    parallel.check_batch_size(config.batch_size, devices=mesh.size, hosts=jax.process_count())

    # ---- input first: a missing, empty or unreadable dataset fails before anything is made
    source = make_source(config, process_index=jax.process_index(), process_count=jax.process_count())

    # ---- the workdir, one run at a time
    paths.makedirs(workdir)
    cleanup.enter_context(checkpoint.lock_workdir(workdir))
    mgr = checkpoint.manager(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    cleanup.callback(mgr.close)
    cleanup.callback(mgr.wait_until_finished)  # runs first: a pending async save completes
    run = logs.run_summary(config, mesh, workdir, source.desc)
    if mgr.all_steps():
        logs.check_resumable(workdir, run)
    if jax.process_index() == 0:
        logs.write_run_summary(workdir, run)

    # ---- models, optimizers, train state: created sharded, or restored into the same shardings
    graphdefs, state, fixed, tx, disc_tx = build(config, mesh, abstract=bool(mgr.all_steps()))
    logging.info("model %s: %.2fM parameters trained, %.2fM frozen; discriminator %.2fM", config.model.preset,
                 count(state["params"]) / 1e6, count(fixed["frozen"]) / 1e6,
                 count(state["disc"]["params"]) / 1e6)
    start, state, fixed["frozen"], skipped = checkpoint.resume(mgr, state, fixed["frozen"])
    if start:
        if jax.process_index() == 0:
            checkpoint.set_aside(mgr, skipped)
        parallel.sync_hosts("checkpoints set aside")
        mgr.reload()
        logging.info("resumed from %s at step %d", workdir, start)
    if jax.process_index() == 0:
        checkpoint.write_model_config(workdir, model_config(config))
    data = cleanup.enter_context(make_train_iterator(config, start_step=start, source=source))

    # ---- the jitted step and sampler, compiled before the first step: hosts finish compiling at
    # different times, and the first collective would not wait long for a late one
    step_fn = jit_step(config, mesh, graphdefs, tx, disc_tx, state, fixed).lower(
        state, fixed, parallel.batch_spec(config, mesh)).compile()
    evaluate_now = config.get("eval_every") and config.eval_every <= config.total_steps
    evaluator = make_evaluator(config, graphdefs) if evaluate_now else None
    grid = held_out_batch(config, GRID_EXAMPLES)
    grid_images, grid_masks = grid["image"], grid["mask"]
    sample_params, rep = state.get("ema", state["params"]), parallel.replicated(mesh)
    sample_fn = jax.jit(make_sample_fn(graphdefs), out_shardings=rep, compiler_options=compiler_options(config),
                        in_shardings=(shardings_of(sample_params), shardings_of(fixed), rep, rep)
                        ).lower(sample_params, fixed, grid_images, grid_masks).compile()
    parallel.sync_hosts("compiled")

    # ---- loop
    writer = logs.MetricWriter(workdir, start)
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
        state, metrics = step_fn(state, fixed, parallel.global_batch(next(data), mesh))
        flush()  # the previous step's metrics, read while this step runs
        pending = (step, metrics)
        stop = preempted(step)
        if stop or mgr.should_save(step) or step == config.total_steps or step % config.sample_every == 0:
            flush()  # never save or show a step whose losses were not checked
        if step % config.sample_every == 0 or step == config.total_steps:
            writer.write(step, write_samples(workdir, step, sample_fn, state, fixed, grid_images, grid_masks))
            writer.image(step, "samples", sample_path(workdir, step))
        if evaluator is not None and step % config.eval_every == 0:
            writer.write(step, evaluator(state.get("ema", state["params"]), fixed))
        checkpoint.save(mgr, step, state, fixed["frozen"], force=stop or step == config.total_steps)
        if stop:
            break
    flush()
    if config.get("train_encoder") and not preempted.requested:
        write_factors(config, workdir, mesh, graphdefs, state, fixed)
    return last


def write_factors(config, workdir, mesh, graphdefs, state, fixed) -> None:
    """A whole autoencoder's own latent factors (`factors.measure`) into its model config, and so its exports."""
    scaling, shift = factors.measure(config, graphdefs["vae"], state.get("ema", state["params"]), fixed["frozen"],
                                     mesh, start_step=config.total_steps)
    if jax.process_index() == 0:
        checkpoint.write_model_config(workdir, model_config(config).replace(scaling_factor=scaling, shift_factor=shift))
    print(f"measured latent factors on {config.get('factor_batches', 8)} training batches: "
          f"scaling_factor={scaling:.6g} shift_factor={shift if shift is None else f'{shift:.6g}'}", flush=True)


def sample_path(workdir: str, step: int) -> str:
    return paths.join(workdir, "samples", f"step_{step:07d}.png")


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def compiler_options(config) -> dict:
    return dict(config.get("compiler_options") or {})


def jit_step(config, mesh, graphdefs, tx, disc_tx, state, fixed):
    """The train step over `mesh`: the state keeps its shardings (and is donated: it is replaced
    every step), the batch is split over every device, the metrics come back replicated."""
    state_shardings = shardings_of(state)
    return jax.jit(make_train_step(config, graphdefs, tx, disc_tx),
                   in_shardings=(state_shardings, shardings_of(fixed), parallel.batch_sharding(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler_options(config))


def write_samples(workdir, step, sample_fn, state, fixed, images, masks) -> dict[str, float]:
    """Saves a labelled grid of held-out photos (host 0) and returns the squared error of the
    plain and (asymmetric decoders) the mask-guided decode on the known region and in the hole."""
    params = state.get("ema", state["params"])
    plain, guided = jax.device_get(sample_fn(params, fixed, images, masks))
    decodes = {"plain": plain, "guided": guided} if "condition_encoder" in params["decoder"] else {"plain": plain}
    if jax.process_index() == 0:
        masked = images * (1 - masks) + masks * -1.0  # holes shown black
        columns = ({"input": images, "masked input": masked, "plain decode": plain, "guided decode": guided}
                   if len(decodes) == 2 else {"input": images, "reconstruction": plain})
        files.save_grid(sample_path(workdir, step), columns)
    # pre_error over the known region (mask 0); over the hole with the mask inverted.
    return {f"samples/{region}_mse_{name}": float(np.mean(pre_error(images, out, hole)))
            for name, out in decodes.items() for region, hole in (("known", masks), ("hole", 1 - masks))}
