"""Orbax checkpoints of a training workdir: periodic async saves, keep-last-k, resume.

A workdir holds `checkpoints/<step>/` (the train state and the frozen parameters) and
`model_config.json` (the `VAEConfig`), which is all an export needs.
"""

import dataclasses
import json

import jax
import orbax.checkpoint as ocp

from asymvq_jax import paths
from asymvq_jax.models import VAEConfig

MODEL_CONFIG = "model_config.json"


def manager(workdir: str, *, keep: int = 3, save_every: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every or 1,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(paths.path(workdir) / "checkpoints", options=options)


def save(mgr: ocp.CheckpointManager, step: int, ckpt, *, force: bool = False) -> bool:
    return mgr.save(step, args=ocp.args.StandardSave(ckpt), force=force)


def restore(mgr: ocp.CheckpointManager, like, step: int | None = None):
    """Restores `step` (default: the latest) into the structure and shardings of `like` (arrays or
    ShapeDtypeStructs): a checkpoint saved on one mesh restores onto any other."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def is_workdir(path: str) -> bool:
    return paths.isfile(paths.join(path, MODEL_CONFIG))


def load_model(workdir: str, *, step: int | None = None, ema: bool = True):
    """The autoencoder of a training workdir at `step` (default: latest), EMA weights if kept."""
    from asymvq_jax.convert import build_model
    from asymvq_jax.convert.keys import str_to_path
    mgr = manager(workdir)
    step = mgr.latest_step() if step is None else step
    if step is None or step not in mgr.all_steps():
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; saved steps: {list(mgr.all_steps())}")
    # Onto this process's first device, whatever mesh and hosts saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = ocp.StandardCheckpointer().metadata(mgr.directory / str(step) / "default")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          getattr(meta, "item_metadata", meta))
    saved = mgr.restore(step, args=ocp.args.StandardRestore(target))
    mgr.close()
    trained = saved["train"]["ema" if ema and "ema" in saved["train"] else "params"]
    flat = {**flatten(trained), **flatten(saved.get("frozen") or {})}
    return build_model(read_model_config(workdir), {str_to_path(k): v for k, v in flat.items()})


def flatten(tree) -> dict[str, object]:
    """{'a.b.0.c': leaf} for a nested dict (list indices come back from orbax as strings)."""
    from asymvq_jax.convert.keys import path_to_str
    return {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_model_config(workdir: str, config: VAEConfig) -> None:
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, MODEL_CONFIG), json.dumps(dataclasses.asdict(config), indent=2))


def read_model_config(workdir: str) -> VAEConfig:
    path = paths.join(workdir, MODEL_CONFIG)
    if not paths.exists(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir: it has no {MODEL_CONFIG}")
    return VAEConfig(**json.loads(paths.read_text(path)))
