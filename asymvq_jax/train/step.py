"""The jitted train step: one decoder forward feeds both the decoder and discriminator updates.

A difference from the authors, declared: their Lightning loop runs a second autoencoder forward for
the discriminator step (a new posterior sample, through the decoder just updated). We reuse the
generator step's reconstruction: half the forward work, and the discriminator sees the output of
the decoder before this step's update and the same posterior sample.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from asymvq_jax.losses import gan
from asymvq_jax.metrics import pre_error
from asymvq_jax.train.state import merge_vae


def apply_disc(graphdef, params, stats, images, group_size=0):
    """Runs the discriminator in train mode (batch statistics per group of `group_size` images);
    returns logits and new stats."""
    disc = nnx.merge(graphdef, params, stats)
    logits = disc(images, group_size=group_size)
    return logits, nnx.to_pure_dict(nnx.state(disc, nnx.Not(nnx.Param)))


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def gan_groups(config) -> tuple[int, int]:
    """(images per group, groups): the adaptive weight and the discriminator's statistics are
    taken per group, as on each of the authors' GPUs; 0 = the whole global batch."""
    size = config.loss.get("gan_group_size") or config.batch_size
    if config.batch_size % size:
        raise ValueError(f"loss.gan_group_size={size} does not divide batch_size={config.batch_size}")
    return size, config.batch_size // size


def make_decoder_grads(config, graphdefs):
    """(state, fixed, batch) -> the decoder's gradient, the reconstruction and the loss terms: the
    authors' generator step, with each group's adaptive weight (see gan.grouped_head_grads)."""
    loss_cfg = config.loss
    base_key = jax.random.key(config.seed)
    group, groups = gan_groups(config)
    # Terms switched off in the config are left out of the compiled step (on a CPU, LPIPS-VGG16
    # is most of a small model's step, and the discriminator a good part of its compile time).
    use_lpips = loss_cfg.perceptual_weight != 0
    use_gan = loss_cfg.disc_factor != 0
    border_weight, border_width = loss_cfg.get("border_weight", 0.0), loss_cfg.get("border_width", 2)
    gap_weight = loss_cfg.get("branch_gap_weight", 0.0)

    def decoder_grads(state, fixed, batch):
        step, x, mask = state["step"], batch["image"], batch["mask"]
        lpips = nnx.merge(graphdefs["lpips"], fixed["lpips"])
        d_params, d_stats = state["disc"]["params"], state["disc"]["stats"]
        factor = gan.disc_factor(step, loss_cfg.disc_start, loss_cfg.disc_factor)
        key = jax.random.fold_in(base_key, step)
        params = state["params"]

        def body(params):  # encode, sample, decode up to conv_out; the KL reaches a trained encoder
            vae = merge_vae(graphdefs["vae"], params, fixed["frozen"])
            post = vae.encode(x)
            image, hole = (x, mask) if vae.config.asymmetric else (None, None)
            gaps = [] if gap_weight and vae.config.asymmetric else None
            h = vae.decoder_features(post.sample(key), image, hole, gaps)
            gap = gan.branch_gap(gaps, mask) if gaps else jnp.zeros((), jnp.float32)
            return h, jnp.mean(post.kl()), gap

        def conv_out(h, conv_params):  # the decoder's own conv_out, in the compute dtype, as decode runs it
            tree = {**params, "decoder": {**params["decoder"], "conv_out": conv_params}}
            return merge_vae(graphdefs["vae"], tree, fixed["frozen"]).decoder.conv_out(h)

        # L1 weighted up on the hole's border (either side), where the blend switches between the decoder's
        # features and the branch's: there a rim shows that the sum over all pixels barely sees.
        weight = 1.0 + border_weight * gan.hole_border(mask, border_width) if border_weight else None

        def nll(x_rec):
            return gan.reconstruction_nll(x, x_rec, loss_cfg.perceptual_weight * lpips(x, x_rec) if use_lpips else None,
                                          weight)

        def group_g(x_rec):  # each group's generator loss, its discriminator statistics its own
            logits = apply_disc(graphdefs["disc"], d_params, d_stats, x_rec, group)[0]
            return jax.vmap(gan.generator_loss)(logits.reshape((groups, group) + logits.shape[1:]))

        (h, kl, gap), body_vjp = jax.vjp(body, params)
        x_rec, nll_value, g, d_weight, d_h, d_conv_out = gan.grouped_head_grads(
            conv_out, h, params["decoder"]["conv_out"], nll, group_g if use_gan else None, factor, group,
            loss_cfg.disc_weight)
        grads = body_vjp((d_h, jnp.asarray(loss_cfg.kl_weight, kl.dtype), jnp.asarray(gap_weight, gap.dtype)))[0]
        grads["decoder"]["conv_out"] = d_conv_out
        terms = {"loss": gan.generator_total_loss(nll_value, kl, g, d_weight, factor, loss_cfg.kl_weight),
                 "kl": kl, "nll": nll_value, "g_loss": jnp.mean(g), "d_weight": jnp.mean(d_weight),
                 "disc_factor": factor}
        if gap_weight:
            terms["loss"] = terms["loss"] + gap_weight * gap
            terms["branch_gap"] = gap
        return grads, x_rec, terms

    return decoder_grads


def make_train_step(config, graphdefs, tx, disc_tx):
    loss_cfg = config.loss
    group, _ = gan_groups(config)
    use_gan = loss_cfg.disc_factor != 0
    decoder_grads = make_decoder_grads(config, graphdefs)

    def train_step(state, fixed, batch):
        step, x, mask = state["step"], batch["image"], batch["mask"]
        d_params, d_stats = state["disc"]["params"], state["disc"]["stats"]
        params = state["params"]
        grads, x_rec, terms = decoder_grads(state, fixed, batch)
        factor = terms["disc_factor"]

        def disc_loss(d_params):
            # Separate calls on real and fake, as the authors' loop does: per-call batch statistics.
            real, stats = apply_disc(graphdefs["disc"], d_params, d_stats, x, group)
            fake, stats = apply_disc(graphdefs["disc"], d_params, stats, x_rec, group)
            return factor * gan.hinge_d_loss(real, fake), (stats, jnp.mean(real), jnp.mean(fake))

        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        new = {"step": step + 1, "params": new_params, "opt": opt, "disc": state["disc"],
               "disc_opt": state["disc_opt"]}

        def disc_update():
            (d_loss, (stats, real, fake)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(d_params)
            d_updates, d_opt = disc_tx.update(d_grads, state["disc_opt"], d_params)
            disc = {"params": optax.apply_updates(d_params, d_updates), "stats": stats}
            # logged in float32 under a bf16 compute dtype too, as disc_waits' zeros are
            return disc, d_opt, tuple(v.astype(jnp.float32) for v in (d_loss, real, fake)), d_grads

        def disc_waits():  # before disc_start the authors' lr is 0: parameters, Adam state and count stay
            zero = jnp.zeros((), jnp.float32)
            return state["disc"], state["disc_opt"], (zero, zero, zero), jax.tree.map(jnp.zeros_like, d_params)

        d_loss = real = fake = jnp.zeros((), jnp.float32)
        d_grads = {}
        if use_gan:
            new["disc"], new["disc_opt"], (d_loss, real, fake), d_grads = jax.lax.cond(factor > 0, disc_update,
                                                                                       disc_waits)
        if "ema" in state:
            new["ema"] = optax.incremental_update(new_params, state["ema"], 1.0 - config.ema_decay)

        metrics = {**terms, "d_loss": d_loss, "logits_real": real, "logits_fake": fake,
                   "l1": jnp.mean(jnp.abs(x - x_rec)), "known_mse": jnp.mean(pre_error(x, x_rec, mask))}
        # A non-finite step leaves the state as it was; the host stops the run on seeing it.
        ok = all_finite((metrics, grads, d_grads))
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, {**state, "step": step + 1})
        return new, metrics

    return train_step


def make_sample_fn(graphdefs):
    """Plain and mask-guided decodes of the posterior mode, for the sample grid (a plain
    autoencoder has no guided decode: it returns the plain one twice)."""

    def sample(params, fixed, x, mask):
        vae = merge_vae(graphdefs["vae"], params, fixed["frozen"])
        z = vae.encode(x).mode()
        plain = vae.decode(z)
        return plain, vae.decode(z, x, mask) if vae.config.asymmetric else plain

    return sample
