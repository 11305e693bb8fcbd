"""The train state (a plain dict of pytrees) and everything that builds it.

`trainable` decides what trains: the decoder (the asymmetric recipe) or, with
`config.train_encoder`, the whole autoencoder (LDM's first stage). The rest lives in `frozen`,
a separate tree that no optimizer sees and that the step never returns, so it cannot change.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from asymvq_jax.losses import LPIPS, NLayerDiscriminator
from asymvq_jax.models import AutoencoderKL, VAEConfig, preset

DECODER = nnx.PathContains("decoder")


def trainable(config):
    """The parameters the optimizer updates; `params` in the train state is rooted at the VAE."""
    return nnx.Param if config.get("train_encoder", False) else nnx.All(nnx.Param, DECODER)


def model_config(config) -> VAEConfig:
    return preset(config.model.preset, **config.model.get("overrides", {}))


def dtypes(config):
    return dict(dtype=jnp.dtype(config.get("dtype", "float32")),
                param_dtype=jnp.dtype(config.get("param_dtype", "float32")))


def init_vae(config) -> tuple[AutoencoderKL, set[str]]:
    """A fresh model, overwritten by every parameter of `config.init_from` with the same path
    and shape. Returns the model and the dotted paths of the trainable parameters it took."""
    vae = AutoencoderKL(model_config(config), rngs=nnx.Rngs(config.seed), remat=config.get("remat", False),
                        **dtypes(config))
    if not config.get("init_from"):
        return vae, set()
    source = dict(nnx.to_flat_state(nnx.state(load_source(config.init_from), nnx.Param)))
    state, trains = nnx.state(vae, nnx.Param), trainable(config)
    taken, pretrained, fresh = [], set(), []
    for path, var in nnx.to_flat_state(state):
        src = source.get(path)
        if src is not None and src[...].shape == var[...].shape:
            var[...] = src[...].astype(var[...].dtype)
            taken.append(dotted(path))
            if trains(path, var):
                pretrained.add(dotted(path))
        elif not trains(path, var):
            raise ValueError(f"init_from={config.init_from}: it does not fit the model at {dotted(path)}, "
                             "a frozen parameter (frozen parts must come whole from the checkpoint)")
        else:
            fresh.append(dotted(path))
    nnx.update(vae, state)
    logging.info("init_from %s: %d parameters loaded, %d trainable parameters fresh (%s)", config.init_from,
                 len(taken), len(fresh), sorted({".".join(p.split(".")[:2]) for p in fresh}) or "none")
    return vae, pretrained


def load_source(path: str) -> AutoencoderKL:
    """A training workdir (its latest step) or any checkpoint from_pretrained reads."""
    from asymvq_jax import checkpoint
    from asymvq_jax.convert import from_pretrained
    return checkpoint.load_model(path) if checkpoint.is_workdir(path) else from_pretrained(path)


def dotted(path) -> str:
    """'decoder.up_blocks.0.conv1.kernel' from an nnx path or a jax key path."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def schedule(config) -> optax.Schedule:
    """Linear warm-up from `warmup_init_mult`x, then cosine to `end_lr` (the authors' recipe)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=config.lr * config.warmup_init_mult, peak_value=config.lr,
        warmup_steps=config.warmup_steps, decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=min(config.end_lr, config.lr))


def adam(lr) -> optax.GradientTransformation:
    return optax.adam(lr, b1=0.5, b2=0.9)


def decoder_optimizer(config, pretrained: set[str]) -> optax.GradientTransformation:
    """Adam with `pretrained_lr_mult` on the parameters taken from init_from (the new branch at 1x)."""
    sched, mult = schedule(config), config.pretrained_lr_mult

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "pretrained" if dotted(path) in pretrained else "new", params)

    return optax.multi_transform({"pretrained": adam(lambda c: mult * sched(c)), "new": adam(sched)},
                                 labels)


def pure(state) -> dict:
    return nnx.to_pure_dict(state)


def build(config):
    """Returns (graphdefs, train state, constants, decoder optimizer, discriminator optimizer)."""
    vae, pretrained = init_vae(config)
    vae_def, params, frozen = nnx.split(vae, trainable(config), ...)
    params = pure(params)
    disc = NLayerDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers, rngs=nnx.Rngs(config.seed + 1),
                               **dtypes(config))
    disc_def, disc_params, disc_stats = nnx.split(disc, nnx.Param, ...)
    lpips_def, lpips_state = nnx.split(LPIPS(config.loss.get("lpips_weights") or None, dtype=dtypes(config)["dtype"]))
    tx, disc_tx = decoder_optimizer(config, pretrained), adam(schedule(config))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params),
             "disc": {"params": pure(disc_params), "stats": pure(disc_stats)},
             "disc_opt": disc_tx.init(pure(disc_params))}
    if config.ema_decay:
        state["ema"] = jax.tree.map(jnp.copy, params)
    consts = {"frozen": pure(frozen), "lpips": pure(lpips_state)}
    graphdefs = {"vae": vae_def, "disc": disc_def, "lpips": lpips_def}
    return graphdefs, state, consts, tx, disc_tx


def merge_vae(graphdef, params, frozen) -> AutoencoderKL:
    return nnx.merge(graphdef, params, frozen)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
