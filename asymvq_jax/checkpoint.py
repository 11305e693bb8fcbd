"""Orbax checkpoints of a training workdir, and `load`: the one way from a checkpoint, a workdir or a
run of stages to a model.

A workdir holds `checkpoints/<step>/` (`_layout`: the train state and the parameters no optimizer
sees) and `model_config.json` (the `VAEConfig`), which is all a model needs. A run of stages holds
a workdir per stage and `stages.json`, their order.
"""

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from asymvq_jax import paths
from asymvq_jax.convert import abstract_model, from_pretrained
from asymvq_jax.convert.keys import path_to_str
from asymvq_jax.convert.readers import config_from_json, read_checkpoint, read_json_object
from asymvq_jax.models import AutoencoderKL, VAEConfig

MODEL_CONFIG = "model_config.json"
STAGES = "stages.json"
LOCK = "train.lock"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, named with the reason."""


def manager(workdir: str, *, keep: int = 3, save_every: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every or 1,
                                           enable_async_checkpointing=True, create=True)
    # The handler named up front lets the manager read a step's tree metadata itself (reading
    # it through a bare checkpointer warns that _CHECKPOINT_METADATA, a step-level file, is missing).
    return ocp.CheckpointManager(paths.path(workdir) / "checkpoints", options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def _layout(state, frozen) -> dict:
    return {"train": state, "frozen": frozen}


def _parts(tree) -> tuple:
    """(train state, frozen parameters) of a tree in `_layout`."""
    return tree["train"], tree.get("frozen") or {}


def save(mgr: ocp.CheckpointManager, step: int, state, frozen, *, force: bool = False) -> bool:
    return mgr.save(step, args=ocp.args.StandardSave(_layout(state, frozen)), force=force)


def resume(mgr: ocp.CheckpointManager, state, frozen) -> tuple[int, object, object, list[int]]:
    """(step, state, frozen, unreadable steps) of the newest step that can be read, restored into
    the structure and shardings of `state` and `frozen`; (0, state, frozen, []) when none is saved."""
    found, saved, skipped = restore(mgr, lambda _: _layout(state, frozen))
    return (found, *_parts(saved), skipped) if saved is not None else (0, state, frozen, skipped)


def restore(mgr: ocp.CheckpointManager, target_of, step: int | None = None) -> tuple[int, object, list[int]]:
    """(step, tree, skipped steps): `step`, or the newest step that can be read. A step that
    cannot be read (a truncated array file, missing metadata) is skipped with a warning that says
    why, and is never deleted; a named `step` that cannot be read is an error.

    `target_of(tree metadata)` gives what to restore into (arrays or ShapeDtypeStructs, with the
    shardings wanted: a checkpoint saved on one mesh restores onto any other); a tree whose
    structure differs from the saved one is an error, not a damaged step.
    """
    saved = sorted(mgr.all_steps(), reverse=True)
    if step is not None and step not in saved:
        raise CheckpointError(f"{mgr.directory}: no checkpoint at step {step}; saved steps: {sorted(saved)}")
    skipped = []
    for s in [step] if step is not None else saved:
        try:
            if not (mgr.directory / str(s) / "default" / "_METADATA").exists():
                raise FileNotFoundError("default/_METADATA, its tree structure, is missing")
            meta = mgr.item_metadata(s)
            if meta is None:
                raise FileNotFoundError("its tree metadata cannot be read")
            meta = getattr(meta, "tree", meta)
            target = target_of(meta)
            _check_structure(mgr.directory / str(s), meta, target)
            return s, mgr.restore(s, args=ocp.args.StandardRestore(target)), skipped
        except CheckpointError:
            raise
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged step
            why = _reason(e)
        where = mgr.directory / str(s)
        if step is not None:
            raise CheckpointError(f"{where} cannot be read: {why}")
        logging.warning("checkpoint %s cannot be read (%s); trying the step before it. It is kept as it is: "
                        "remove that folder to drop it, or name a step with --step", where, why)
        skipped.append(s)
    if skipped:
        raise CheckpointError(f"{mgr.directory}: no checkpoint can be read (steps {skipped}, each named above); "
                              "move them away to start afresh")
    return 0, None, []


def _check_structure(where, meta, target) -> None:
    """The trained and frozen parameters (plain dicts) must match by path; what the optimizer
    state holds follows from them."""
    def parts(tree):
        train, frozen = _parts(tree)
        return ({f"train.{k}" for k in train} | {f"train.params.{k}" for k in flatten(train.get("params", {}))}
                | {f"frozen.{k}" for k in flatten(frozen)})
    saved, wanted = parts(meta), parts(target)
    if saved != wanted:
        only_saved, only_wanted = sorted(saved - wanted), sorted(wanted - saved)
        raise CheckpointError(
            f"{where} holds another train state than this run builds: {len(only_saved)} entries only in the "
            f"checkpoint (e.g. {only_saved[:2]}), {len(only_wanted)} only in this run (e.g. {only_wanted[:2]})")


def _reason(e: BaseException) -> str:
    """The innermost cause's first line: orbax wraps tensorstore's useful message in a long one."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable steps to `<step>.unreadable` (kept, never deleted), so that a resumed
    run can save those steps again."""
    for s in steps:
        where = mgr.directory / str(s)
        aside = mgr.directory / f"{s}.unreadable"
        n = 1
        while aside.exists():
            aside, n = mgr.directory / f"{s}.unreadable.{n}", n + 1
        where.rename(aside)
        logging.warning("moved the unreadable checkpoint %s to %s; this run saves step %d again", where, aside, s)


class WorkdirBusyError(RuntimeError):
    """Another run trains in the same workdir."""


@contextlib.contextmanager
def lock_workdir(workdir: str):
    """One run per workdir: an exclusive lock on `<workdir>/train.lock`, which the system releases
    when the process ends, however it ends. Object stores have no such lock: not checked there."""
    if paths.is_remote(workdir) or jax.process_index() != 0:
        yield
        return
    f = open(paths.join(workdir, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WorkdirBusyError(f"{workdir} is in use by another training run ({holder}); wait for it to end, "
                               "or give this run another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()  # releases the lock


def is_workdir(path: str) -> bool:
    return paths.isfile(paths.join(path, MODEL_CONFIG))


def flatten(tree) -> dict[str, object]:
    """{'a.b.0.c': leaf} for a nested dict (list indices come back from orbax as strings)."""
    return {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_model_config(workdir: str, config: VAEConfig) -> None:
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, MODEL_CONFIG), json.dumps(config.to_dict(), indent=2))


def read_model_config(workdir: str) -> VAEConfig:
    path = paths.join(workdir, MODEL_CONFIG)
    if not paths.exists(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir: it has no {MODEL_CONFIG}")
    return config_from_json(read_json_object(path), path)


def write_stages(workdir: str, names) -> None:
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, STAGES), json.dumps(list(names)))


def _workdir(path) -> str | None:
    """The training workdir `path` names: itself, or the last stage of a run of stages."""
    if is_workdir(path):
        return path
    if paths.isfile(paths.join(path, STAGES)):
        last = json.loads(paths.read_text(paths.join(path, STAGES)))[-1]
        if not is_workdir(paths.join(path, last)):
            raise FileNotFoundError(f"{path}: its last stage {last!r} has not started; name an earlier stage's "
                                    "folder to load that one")
        return paths.join(path, last)
    return None


def load(source, *, step: int | None = None, ema: bool = True, dtype=None, allow_pickle: bool = False,
         family: str | None = None) -> AutoencoderKL:
    """The autoencoder in `source`, local or gs://: any checkpoint `from_pretrained` reads (`family`:
    of a single file without a config, see there), a training workdir (`step`, or the newest step that
    can be read; EMA weights when the run kept them and `ema`), a run of stages (its last stage; give a
    stage's folder for another), or a model. `dtype`: the compute dtype (default float32); parameters
    stay float32."""
    dtype = jnp.dtype(dtype or jnp.float32)
    if isinstance(source, AutoencoderKL):
        return source if source.compute_dtype == dtype else recast(source, dtype)
    workdir = _workdir(source)
    if workdir is None:
        return from_pretrained(source, allow_pickle=allow_pickle, dtype=dtype, family=family)
    return _load_workdir(workdir, step, ema, dtype)


def load_config(source, *, family: str | None = None) -> VAEConfig:
    """The config of the model `load(source)` gives, without its weights where that is possible."""
    workdir = _workdir(source)
    return read_model_config(workdir) if workdir is not None else _checkpoint_config(source, family)


@functools.lru_cache(maxsize=4)
def _checkpoint_config(path, family: str | None) -> VAEConfig:
    # Cached: a checkpoint is read whole (a full SD file is GBs), and the config is asked for repeatedly.
    return read_checkpoint(path, family=family).config


def recast(vae: AutoencoderKL, dtype) -> AutoencoderKL:
    """`vae` computing in `dtype`, sharing its parameters."""
    return nnx.merge(nnx.graphdef(abstract_model(vae.config, dtype=dtype)[1]), nnx.state(vae))


def _load_workdir(workdir: str, step: int | None, ema: bool, dtype) -> AutoencoderKL:
    config = read_model_config(workdir)
    mgr = manager(workdir)
    device = jax.sharding.SingleDeviceSharding(_default_device())  # whatever mesh and hosts saved it
    try:
        found, saved, skipped = restore(mgr, lambda meta: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta), step)
    finally:
        mgr.close()
    if saved is None:
        raise CheckpointError(f"{workdir}: no checkpoint saved yet")
    if skipped:
        logging.warning("%s: using step %d, the newest that can be read", workdir, found)
    train, frozen = _parts(saved)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype)[1])

    def fill(var, value):
        want = var.get_value()
        if want.shape != value.shape:
            raise CheckpointError(f"{workdir} step {found}: a parameter of shape {value.shape} where "
                                  f"{MODEL_CONFIG} makes {want.shape}")
        return var.replace(jnp.asarray(value, want.dtype))

    for tree in (train["ema"] if ema and "ema" in train else train["params"], frozen):
        nnx.replace_by_pure_dict(state, tree, fill)
    missing = [path for path, var in nnx.to_flat_state(state) if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise CheckpointError(f"{workdir} step {found}: the checkpoint lacks {len(missing)} parameters, "
                              f"e.g. {path_to_str(missing[0])}")
    return nnx.merge(graphdef, state)


def _default_device():
    device = jax.config.jax_default_device  # set by `with jax.default_device(...)`
    return device if isinstance(device, jax.Device) else jax.local_devices()[0]
