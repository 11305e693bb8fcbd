"""The device mesh and the shardings of the train state and the batch (jit + NamedSharding).

Data parallel over every device of every host: the batch is split on the "data" axis and
the train state is replicated. Each host feeds only its own slice of the global batch.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh() -> Mesh:
    return jax.make_mesh((jax.device_count(),), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the hosts' slices into arrays sharded over the whole mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {mesh.size} devices of the mesh")
