"""Hosts, the device mesh, and the shardings of the train state and the batch (jit + NamedSharding).

The mesh has two axes: `data` (pure data parallel) and `fsdp` (data parallel whose devices also
split the large parameters and their optimizer state). The batch is split over both. On several
TPU slices the `data` axis spans slices (DCN) and `fsdp` stays inside a slice (ICI).
"""

import logging
import math
import os

import jax
import numpy as np
from jax._src import cloud_tpu_init  # jax's own TPU VM check, as its cluster detection uses it
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
FSDP_MIN_SIZE = 2**18  # elements; smaller arrays replicate (splitting them saves little and costs a gather)


def initialize(config) -> None:
    """Joins the other hosts (before anything touches a device) and sets up the compile cache.

    `config.distributed` names a coordinator for hosts jax cannot discover (CPU tests, clusters
    without auto-detection); on a Cloud TPU VM or with JAX_COORDINATOR_ADDRESS set, jax finds
    the other hosts itself.
    """
    dist = config.get("distributed") or {}
    if jax.distributed.is_initialized():
        pass
    elif dist.get("coordinator_address"):
        if dist.get("cpu_collectives"):
            jax.config.update("jax_cpu_collectives_implementation", dist["cpu_collectives"])
        jax.distributed.initialize(coordinator_address=dist["coordinator_address"],
                                   num_processes=dist["num_processes"], process_id=dist["process_id"],
                                   heartbeat_timeout_seconds=dist.get("heartbeat_timeout_s", 100))
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or on_tpu_vm():
        jax.distributed.initialize()
    if config.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one host reports


def on_tpu_vm() -> bool:
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def mesh_shape(sizes: dict, device_count: int) -> tuple[int, int]:
    """(data, fsdp) from config sizes where one may be -1: whatever the other leaves."""
    shape = [int(sizes.get(DATA, -1)), int(sizes.get(FSDP, 1))]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh {dict(zip(AXES, shape))}: sizes must be >= 1, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if device_count % known:
        raise ValueError(f"config.mesh {dict(zip(AXES, shape))} does not divide the {device_count} devices")
    shape = [device_count // known if s == -1 else s for s in shape]
    if math.prod(shape) != device_count:
        raise ValueError(f"config.mesh {dict(zip(AXES, shape))} uses {math.prod(shape)} of {device_count} devices")
    return tuple(shape)


def make_mesh(sizes: dict | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all). Slices split the data axis."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes or {}, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(f"mesh data={shape[0]} must be a multiple of the {slices} slices")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1]), (slices, 1), devices)
    elif len(devices) == len(jax.devices()):
        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        grid = np.asarray(devices).reshape(shape)  # a subset: no topology to optimise for
    return Mesh(grid, AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({jax.process_count()} hosts)"


# ---- shardings: one rule for every tree

def spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Large arrays are split over `fsdp` on their largest divisible dimension; the rest replicate."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda d: (shape[d], d))  # ties: the later (output) dimension
    return P(*[FSDP if d == best else None for d in range(len(shape))])


def shardings(tree, mesh: Mesh, min_size: int):
    """NamedShardings for every array of a (possibly abstract) tree."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, spec(tuple(x.shape), fsdp, min_size)), tree)


def fsdp_min_size(config) -> int:
    mesh = config.get("mesh")
    return int(mesh.get("fsdp_min_size", FSDP_MIN_SIZE)) if mesh is not None else FSDP_MIN_SIZE


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the hosts' slices into arrays sharded over the whole mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def batch_spec(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch, abstractly (to compile the step before data arrives)."""
    shape, sharding = (config.batch_size, config.image_size, config.image_size), batch_sharding(mesh)
    return {"image": jax.ShapeDtypeStruct((*shape, 3), np.float32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct((*shape, 1), np.float32, sharding=sharding)}


def sync_hosts(name: str, timeout_s: int = 3600) -> None:
    """A barrier through the coordinator rather than a device collective, patient with slow hosts."""
    if jax.process_count() > 1:
        multihost.sync_global_processes(name, timeout=timeout_s)


def check_batch_size(batch_size: int, *, devices: int = 1, hosts: int = 1, what: str = "config.batch_size") -> None:
    """The one divisibility check: every device and every host gets an equal part."""
    for parts, name in ((devices, "devices of the mesh"), (hosts, "hosts")):
        if batch_size % parts:
            raise ValueError(f"{what}={batch_size} is not divisible by the {parts} {name}")
