"""A trained autoencoder's own latent factors, measured on its training data as SD3 and FLUX chose
theirs: scaling_factor = 1 / std of the latents, shift_factor (if asked) = their mean, so that
`(z - shift) * scaling` has unit standard deviation (and zero mean) there."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asymvq_jax import parallel
from asymvq_jax.data import make_train_iterator


def measure(config, graphdef, params, frozen, mesh, start_step: int) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor or None) over `config.factor_batches` training batches from
    `start_step` on, of the posterior mode (the latents the encoder gives a diffusion model)."""

    @jax.jit
    def moments(params, frozen, image):
        z = nnx.merge(graphdef, params, frozen).encode(image).mode().astype(jnp.float32)
        return jnp.mean(z), jnp.mean(jnp.square(z))

    means, squares = [], []
    data = make_train_iterator(config, start_step=start_step, background=False)
    try:
        for _ in range(config.get("factor_batches", 8)):
            mean, square = moments(params, frozen, parallel.global_batch(next(data), mesh)["image"])
            means.append(float(mean))
            squares.append(float(square))
    finally:
        data.close()
    mean = float(np.mean(means, dtype=np.float64))
    std = float(np.sqrt(max(np.mean(squares, dtype=np.float64) - mean**2, 1e-12)))
    return 1.0 / std, (mean if config.get("measure_shift", False) else None)
