"""Runs the tiny model on simulated devices and several processes, for test_parallel and test_multihost.

Device counts are fixed when jax starts, so each run is a subprocess with its own XLA_FLAGS.
`python -m tests.multidevice steps OUT PHOTOS LPIPS` (8 devices): one train step on
several meshes, saved to OUT for the tests to compare.
"""

import json
import os
import socket
import subprocess
import sys

from tests.conftest import ROOT, xla_flags

# Pure data parallelism, and data and fsdp together. A 4x2 mesh would be the same code path with other
# factors; the runlocal run in test_parallel trains on one.
MESHES = {"1": (1, {}), "8x1": (8, {"data": 8, "fsdp": 1}), "2x4": (8, {"data": 2, "fsdp": 4})}


def env(devices: int, **extra) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int, log_path: str, **extra) -> subprocess.Popen:
    """A subprocess of this tree with `devices` simulated CPU devices; output goes to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(devices, **extra), stdout=log,
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log_path: str, timeout: float = 1800) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a run behind
        raise
    text = open(log_path).read()
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def tiny(photos: str, lpips: str, **changes):
    from tests import tiny_config
    c = tiny_config.get_config()
    c.data.path, c.loss.lpips_weights = photos, lpips
    c.batch_size, c.mesh.fsdp_min_size = 8, 2**8  # the tiny kernels are large enough to split
    c.update_from_flattened_dict(changes)
    return c


def steps(out: str, photos: str, lpips: str) -> None:
    """One step on each mesh of MESHES: metrics, updated parameters, and what each device holds."""
    import jax
    import numpy as np

    from asymvq_jax import checkpoint, parallel
    from asymvq_jax.data import batch_for_step
    from asymvq_jax.train.loop import jit_step
    from asymvq_jax.train.state import build

    config = tiny(photos, lpips)
    batch = batch_for_step(config, 0, process_index=0, process_count=1)
    report = {}
    for name, (count, sizes) in MESHES.items():
        mesh = parallel.make_mesh(sizes, jax.devices()[:count])
        graphdefs, state, fixed, tx, disc_tx = build(config, mesh)
        held = {path: (x.nbytes, x.addressable_shards[0].data.nbytes, str(x.sharding.spec))
                for path, x in checkpoint.flatten({"params": state["params"], "opt": state["opt"]}).items()}
        global_batch = parallel.global_batch(batch, mesh)
        state, metrics = jit_step(config, mesh, graphdefs, tx, disc_tx, state, fixed)(state, fixed, global_batch)
        np.savez(os.path.join(out, f"params_{name}.npz"), **checkpoint.flatten(jax.device_get(state["params"])))
        report[name] = {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}, "held": held,
                        "batch_shards": [s.data.shape[0] for s in global_batch["image"].addressable_shards]}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)


def authors_ddp_grads(config, graphdefs, state, fixed, batch, group: int):
    """The authors' DDP arithmetic, written out: each GPU (a group of `group` images) decodes its own
    images, takes its adaptive weight from two full gradients w.r.t. conv_out's kernel, with the
    discriminator's statistics over its images alone, then the gradient of its own total loss; DDP
    averages the GPUs' gradients. GAN on (factor 1), posterior noise as the step draws it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from asymvq_jax.losses import gan
    from asymvq_jax.train.state import merge_vae
    loss = config.loss
    x, mask, params = batch["image"], batch["mask"], state["params"]
    lpips = nnx.merge(graphdefs["lpips"], fixed["lpips"])
    key = jax.random.fold_in(jax.random.key(config.seed), 0)

    def gpu_terms(p, k):
        own = lambda a: jax.lax.dynamic_slice_in_dim(a, k * group, group)  # noqa: E731
        vae = merge_vae(graphdefs["vae"], p, fixed["frozen"])
        post = vae.encode(x)  # per image: encoding the batch and slicing equals encoding the slice
        x_rec = vae.decode(own(post.sample(key)), own(x), own(mask))
        nll = gan.reconstruction_nll(own(x), x_rec, loss.perceptual_weight * lpips(own(x), x_rec))
        g = gan.generator_loss(nnx.merge(graphdefs["disc"], state["disc"]["params"], state["disc"]["stats"])(x_rec))
        return nll, g, jnp.mean(own(post.kl()))

    def gpu_grad(k):
        kernel = lambda f: jax.grad(f)(params)["decoder"]["conv_out"]["kernel"]  # noqa: E731
        g_nll, g_g = kernel(lambda p: gpu_terms(p, k)[0]), kernel(lambda p: gpu_terms(p, k)[1])
        w = loss.disc_weight * jnp.clip(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4), 0.0, 1e4)

        def total(p):
            nll, g, kl = gpu_terms(p, k)
            return nll + loss.kl_weight * kl + w * g
        return jax.grad(total)(params), w

    grads, weights = jax.lax.map(gpu_grad, jnp.arange(config.batch_size // group))
    return jax.tree.map(lambda g: jnp.mean(g, 0), grads), weights


def groups(out: str, photos: str, lpips: str) -> None:
    """The decoder's gradient with GAN groups of 2 (GAN on) on 1 device and on 8, and the authors'
    DDP arithmetic on 1, saved to OUT."""
    import jax
    import numpy as np

    from asymvq_jax import checkpoint, parallel
    from asymvq_jax.data import batch_for_step
    from asymvq_jax.train.loop import shardings_of
    from asymvq_jax.train.state import build
    from asymvq_jax.train.step import make_decoder_grads

    config = tiny(photos, lpips, **{"loss.gan_group_size": 2, "loss.disc_start": 0})
    batch = batch_for_step(config, 0, process_index=0, process_count=1)
    weights = {}
    for name in ("1", "8x1"):
        count, sizes = MESHES[name]
        mesh = parallel.make_mesh(sizes, jax.devices()[:count])
        graphdefs, state, fixed, _, _ = build(config, mesh)
        grads_fn = jax.jit(make_decoder_grads(config, graphdefs),
                           in_shardings=(shardings_of(state), shardings_of(fixed), parallel.batch_sharding(mesh)),
                           out_shardings=parallel.replicated(mesh))
        grads, _, terms = grads_fn(state, fixed, parallel.global_batch(batch, mesh))
        np.savez(os.path.join(out, f"grads_{name}.npz"), **checkpoint.flatten(jax.device_get(grads)))
        weights[name] = float(terms["d_weight"])
        if name == "1":
            ddp, per_gpu = jax.jit(lambda *a: authors_ddp_grads(config, graphdefs, *a, group=2))(state, fixed, batch)
            np.savez(os.path.join(out, "grads_authors.npz"), **checkpoint.flatten(jax.device_get(ddp)))
            weights["authors"] = float(np.mean(per_gpu))
            weights["authors_per_gpu"] = [float(w) for w in per_gpu]
    with open(os.path.join(out, "weights.json"), "w") as f:
        json.dump(weights, f)


def host(record_dir: str, *train_args: str) -> None:
    """train.py, watched: what this process read (a digest per step) and whether it drew grids."""
    import hashlib

    import jax
    from absl import app

    import train
    from asymvq_jax import files
    from asymvq_jax.train import loop

    seen = {"batches": [], "grids": 0}
    make_iterator, save_grid = loop.make_train_iterator, files.save_grid

    class Watched:
        def __init__(self, *args, **kwargs):
            self.it = make_iterator(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __next__(self):
            batch = next(self.it)
            seen["batches"].append(hashlib.sha1(batch["image"].tobytes()).hexdigest())
            return batch

    def counted_grid(*args):
        seen["grids"] += 1
        save_grid(*args)

    loop.make_train_iterator, files.save_grid = Watched, counted_grid
    try:
        app.run(train.main, argv=["train.py", *train_args])
    except SystemExit as e:
        if e.code:
            raise
    finally:
        with open(os.path.join(record_dir, f"process_{jax.process_index()}.json"), "w") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    {"steps": steps, "groups": groups, "host": host}[sys.argv[1]](*sys.argv[2:])
