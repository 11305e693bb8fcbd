"""The train state (a plain dict of pytrees) and everything that builds it.

`trainable` decides what trains: the decoder (the asymmetric recipe) or, with
`config.train_encoder`, the whole autoencoder (LDM's first stage). The rest lives in `frozen`,
a separate tree that no optimizer sees and that the step never returns, so it cannot change.
Everything is described abstractly first and created straight into its shardings.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from asymvq_jax import checkpoint, parallel
from asymvq_jax.convert.keys import path_to_str
from asymvq_jax.losses import LPIPS, NLayerDiscriminator
from asymvq_jax.models import AutoencoderKL, VAEConfig, preset

DECODER = nnx.PathContains("decoder")


def trainable(config):
    """The parameters the optimizer updates; `params` in the train state is rooted at the VAE."""
    return nnx.Param if config.get("train_encoder", False) else nnx.All(nnx.Param, DECODER)


# What the encoder, and with it the latents, is made of: it comes from init_from, never the preset.
ENCODER_FIELDS = ("in_channels", "down_block_out_channels", "layers_per_down_block", "latent_channels",
                  "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv")


def model_config(config) -> VAEConfig:
    """The preset (and overrides) names the decoder; with init_from, the encoder and the latent family
    (widths, latent channels, quant convs, factors) are the checkpoint's."""
    overrides = dict(config.model.get("overrides", {}))
    cfg = preset(config.model.preset, **overrides)
    if not config.get("init_from"):
        return cfg
    source = checkpoint.load_config(config.init_from, family=config.get("init_family") or None)
    clash = [f"{f}={overrides[f]!r} (init_from has {getattr(source, f)!r})" for f in ENCODER_FIELDS
             if f in overrides and getattr(cfg, f) != getattr(source, f)]
    if clash:
        raise ValueError(f"model.overrides {', '.join(clash)}: the encoder comes from init_from={config.init_from}")
    return cfg.replace(**{f: getattr(source, f) for f in ENCODER_FIELDS})


def dtypes(config):
    return dict(dtype=jnp.dtype(config.get("dtype", "float32")),
                param_dtype=jnp.dtype(config.get("param_dtype", "float32")))


def warmup_cosine(config, peak: float, horizon: int) -> optax.Schedule:
    """The authors' LambdaWarmUpCosineScheduler: linear from `warmup_init_mult` x `peak` to `peak`
    over warmup_steps, then a cosine to the absolute `end_lr` at `horizon`, flat after. Written
    as theirs is (optax's form loses 1e-6 of the value in float32 early in the warm-up)."""
    warmup, end = config.warmup_steps, min(config.end_lr, peak)
    start, decay = peak * config.warmup_init_mult, max(horizon - warmup, 1)
    if start == peak == end:  # flat (the tests' config): runs of any length then compile the same step
        return lambda count: jnp.asarray(peak, jnp.float32)

    def lr(count):
        n = jnp.asarray(count, jnp.float32)
        t = jnp.minimum((n - warmup) / decay, 1.0)
        return jnp.where(n < warmup, start + (peak - start) * (n / warmup),
                         end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * t)))
    return lr


def decoder_schedules(config) -> dict[str, optax.Schedule]:
    """Per decoder group: the parameters taken from init_from at `pretrained_lr_mult` x lr, the
    rest at lr; each ends at the same absolute end_lr."""
    return {"pretrained": warmup_cosine(config, config.pretrained_lr_mult * config.lr, config.total_steps),
            "new": warmup_cosine(config, config.lr, config.total_steps)}


def disc_schedule(config) -> optax.Schedule:
    """The authors' LambdaWarmUpCosineScheduler_D over the discriminator optimizer's own count,
    which the step advances only from loss.disc_start on (count = step - disc_start): 0 at the
    first update, then its own warm-up and a cosine ending at the same horizon as the decoder's."""
    sched = warmup_cosine(config, config.lr, config.total_steps - config.loss.disc_start)
    return lambda count: jnp.where(count > 0, sched(count), 0.0)


def adam(lr) -> optax.GradientTransformation:
    return optax.adam(lr, b1=0.5, b2=0.9)


def decoder_optimizer(config, pretrained: set[str]) -> optax.GradientTransformation:
    """Adam with the pretrained schedule on the parameters taken from init_from, the new one on the rest."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "pretrained" if path_to_str(path) in pretrained else "new", params)

    return optax.multi_transform({group: adam(s) for group, s in decoder_schedules(config).items()}, labels)


def pure(state) -> dict:
    return nnx.to_pure_dict(state)


def key_path(path) -> tuple:
    return tuple(getattr(k, "key", k) for k in path)


def fresh_trees(config):
    """Newly initialised models as pure trees, and their graphdefs. Run it under `jax.eval_shape`
    or `jax.jit`: eagerly it would put every parameter on one device."""
    vae = AutoencoderKL(model_config(config), rngs=nnx.Rngs(config.seed), remat=config.get("remat") or False,
                        init=config.get("fresh_init", "torch"), **dtypes(config))
    vae_def, params, frozen = nnx.split(vae, trainable(config), ...)
    disc = NLayerDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers, rngs=nnx.Rngs(config.seed + 1),
                               **dtypes(config))
    disc_def, disc_params, disc_stats = nnx.split(disc, nnx.Param, ...)
    trees = {"params": pure(params), "frozen": pure(frozen),
             "disc": {"params": pure(disc_params), "stats": pure(disc_stats)}}
    return {"vae": vae_def, "disc": disc_def}, trees


def read_source(path: str, family: str | None = None) -> dict[tuple, np.ndarray]:
    """The parameters of anything `checkpoint.load` reads (`family`: see there), by path, in host
    memory: each device then receives only its shard (`place`)."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        flat = nnx.to_flat_state(nnx.state(checkpoint.load(path, family=family), nnx.Param))
    return {key_path(k): np.asarray(v[...]) for k, v in flat}


def pretrained_source(config, trees) -> tuple[dict[tuple, np.ndarray], set[str]]:
    """The init_from parameters that fit `trees` by path and shape, and the dotted paths of the
    trainable ones among them. The frozen parts must all fit; trainable parameters that do not
    stay fresh (e.g. a new branch), and with `init_decoder` False all of them do (the authors'
    x1.5 and x2 decoders take nothing from SD, even where a shape matches)."""
    source, fits, fresh, pretrained = read_source(config.init_from, config.get("init_family") or None), {}, [], set()
    load_trained = config.get("init_decoder", True)
    for trains, tree in ((True, trees["params"]), (False, trees["frozen"])):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = key_path(path)
            if key in source and source[key].shape == x.shape and (load_trained or not trains):
                fits[key] = source[key]
                if trains:
                    pretrained.add(path_to_str(key))
            elif trains:
                fresh.append(key)
            else:
                raise ValueError(f"init_from={config.init_from}: it does not fit the model at {path_to_str(key)}, "
                                 "a frozen parameter (frozen parts must come whole from the checkpoint)")
    logging.info("init_from %s: %d parameters loaded, %d trainable parameters fresh (%s)", config.init_from,
                 len(fits), len(fresh), sorted({".".join(map(str, k[:2])) for k in fresh}) or "none")
    return fits, pretrained


def place(tree, source):
    """Replaces the arrays `source` holds, each device receiving only its own shard."""
    def put(path, x):
        src = source.get(key_path(path))
        if src is None:
            return x
        src = src.astype(x.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda index: src[index])
    return jax.tree_util.tree_map_with_path(put, tree)


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lpips_on_host(config):
    """LPIPS comes from a file: read into host memory, then placed like any other tree."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        lpips_def, state = nnx.split(LPIPS(config.loss.get("lpips_weights") or None, dtype=dtypes(config)["dtype"]))
        return lpips_def, pure(state)


def runs_once_options() -> dict:
    """Compiler options for the initialisers, which run once: LLVM at -O1 compiles them in about a
    third of the CPU time of the default -O2 and gives the same bits. Where XLA_FLAGS sets a level
    (the tests' simulated-device processes: -O0, whose bits differ in the last place) that level
    stays, so a process gets the initial weights its flags always gave it."""
    if "--xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {"xla_backend_optimization_level": 1}


def build(config, mesh=None, *, abstract: bool = False):
    """Returns (graphdefs, train state, fixed, decoder optimizer, discriminator optimizer); `fixed`
    holds what the step reads and never updates: the frozen VAE parameters and LPIPS's weights.

    The state is described with `jax.eval_shape`, then created by jitted calls straight into
    the shardings `parallel.shardings` gives it (init_from weights go shard by shard), so with
    fsdp > 1 no device ever holds a whole copy. `abstract=True` gives the state and the frozen
    parameters as ShapeDtypeStructs with their shardings: what a restore fills.
    """
    mesh = mesh or parallel.make_mesh(config.get("mesh"))
    shard = lambda tree: parallel.shardings(tree, mesh, parallel.fsdp_min_size(config))  # noqa: E731
    graphdefs = {}

    def fresh():
        defs, trees = fresh_trees(config)
        graphdefs.update(defs)
        return trees

    trees = jax.eval_shape(fresh)
    trees = with_shardings(trees, shard(trees))
    source, pretrained = pretrained_source(config, trees) if config.get("init_from") else ({}, set())
    tx = decoder_optimizer(config, pretrained)
    disc_tx = adam(disc_schedule(config))

    def make_state(params, disc):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params), "disc": disc,
                 "disc_opt": disc_tx.init(disc["params"])}
        if config.ema_decay:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    abstract_state = jax.eval_shape(make_state, trees["params"], trees["disc"])
    state_shardings = shard(abstract_state)
    if abstract:
        state, frozen = with_shardings(abstract_state, state_shardings), trees["frozen"]
    else:
        trees = jax.jit(fresh, out_shardings=jax.tree.map(lambda x: x.sharding, trees),
                        compiler_options=runs_once_options())()
        params, frozen = place(trees["params"], source), place(trees["frozen"], source)
        state = jax.jit(make_state, out_shardings=state_shardings, donate_argnums=(0, 1))(params, trees["disc"])
    graphdefs["lpips"], lpips = lpips_on_host(config)
    fixed = {"frozen": frozen, "lpips": jax.device_put(lpips, shard(lpips))}
    return graphdefs, state, fixed, tx, disc_tx


def merge_vae(graphdef, params, frozen) -> AutoencoderKL:
    return nnx.merge(graphdef, params, frozen)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
