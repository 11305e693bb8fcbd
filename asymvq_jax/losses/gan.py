"""Loss terms of the authors' recipe (LDM ``LPIPSWithDiscriminator``), in JAX.

Generator (decoder) step, as in LDM::

    nll      = reconstruction_nll(x, x_rec, lpips(x, x_rec))         # sum / batch
    kl       = mean(posterior.kl())                                    # sum / batch
    g        = generator_loss(D(x_rec))                                # -mean D(x_rec)
    d_weight = ||d nll/dW|| / ||d g/dW|| * disc_weight  (W: conv_out)  # stop-gradient
    loss     = nll + 1e-6 * kl + d_weight * disc_factor(step, disc_start) * g

(per group of images, as each of the authors' GPUs computes it: see grouped_head_grads)

Discriminator step::

    d_loss = disc_factor(step, disc_start) * hinge_d_loss(D(x), D(stop_gradient(x_rec)))

Images are NHWC in [-1, 1].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from asymvq_jax.models.condition import downsample_mask

DISC_WEIGHT = 0.8
KL_WEIGHT = 1e-6
DISC_START = 50001
PERCEPTUAL_WEIGHT = 1.0


# ------------------------------------------------------------------------- GAN terms
def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))``."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """``-mean D(x_rec)``."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def disc_factor(step: jax.Array | int, disc_start: int = DISC_START, factor: float = 1.0) -> jax.Array:
    """``factor`` once ``step >= disc_start``, else 0 (LDM ``adopt_weight``).  Uses the
    traced step (``jnp.where``), so one compiled train step serves both phases."""
    return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(factor), jnp.float32(0.0))


# ---------------------------------------------------------------- reconstruction / KL
def reconstruction_nll(x: jax.Array, x_rec: jax.Array, p_loss: jax.Array | None = None,
                       pixel_weight: jax.Array | None = None) -> jax.Array:
    """The authors' NLL term.

    ``rec = |x - x_rec| + p_loss`` with the per-image (already weighted) LPIPS ``p_loss``
    (shape ``[B]``) broadcast over every pixel and channel, then summed over C*H*W (and
    batch) and divided by the batch size. Their ``rec / exp(logvar) + logvar`` is ``rec``:
    logvar stays 0, as no optimizer holds it.

    The scale matters: summing over C*H*W (196,608 terms at 256x256x3) instead of taking a
    mean makes this term ~2e5 times larger than a mean-L1 loss.  The KL weight 1e-6 is
    calibrated against this sum, and the adaptive GAN weight is the ratio of gradient
    norms ``||grad nll|| / ||grad g||``, so the GAN/reconstruction balance and the 0.8
    ``disc_weight`` only reproduce the paper with exactly this normalisation.  (LPIPS
    enters H*W*C times: once per broadcast pixel.)

    `pixel_weight` ([B, H, W, 1], optional; not the authors') scales the L1 term per pixel, LPIPS not.
    """
    x = x.astype(jnp.float32)
    rec = jnp.abs(x - x_rec.astype(jnp.float32))
    if pixel_weight is not None:
        rec = rec * pixel_weight.astype(jnp.float32)
    if p_loss is not None:
        rec = rec + jnp.asarray(p_loss, jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.sum(rec) / x.shape[0]


def hole_border(mask: jax.Array, width: int) -> jax.Array:
    """1 on the pixels within `width` pixels (Chebyshev) of the hole's border, on either side; 0 elsewhere.
    `mask` is [B, H, W, 1], 1 in the hole."""
    window, pad = (1, 2 * width + 1, 2 * width + 1, 1), ((0, 0), (width, width), (width, width), (0, 0))
    dilated = jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), pad)
    eroded = jax.lax.reduce_window(mask, jnp.inf, jax.lax.min, window, (1, 1, 1, 1), pad)
    return dilated - eroded


def branch_gap(gaps: list[tuple[jax.Array, jax.Array]], mask: jax.Array) -> jax.Array:
    """Not the authors': how far the branch's features stand from the decoder's own where they replace
    them (the known region), at each blend (`Decoder.up`'s gaps): their mean squared difference over the
    variance of the decoder's features, averaged over the blends. No gradient reaches the decoder's side.

    The decoder's GroupNorms take their statistics over the whole feature map, the known region's branch
    features included, and its convs reach across the hole's border: features far from the decoder's
    own move the hole's colours and draw the mask's outline."""
    gaps_rel = []
    for own, branch in gaps:
        own = jax.lax.stop_gradient(own.astype(jnp.float32))
        known = 1.0 - downsample_mask(mask, own.shape[1]).astype(jnp.float32)
        squared = jnp.sum(known * jnp.square(branch.astype(jnp.float32) - own))
        gaps_rel.append(squared / (jnp.sum(known) * own.shape[-1] + 1.0) / (jnp.var(own) + 1e-6))
    return jnp.mean(jnp.stack(gaps_rel))


# -------------------------------------------------------------------- adaptive weight
def adaptive_weight_from_grads(nll_grad: jax.Array, g_grad: jax.Array,
                               disc_weight: float = DISC_WEIGHT) -> jax.Array:
    """``clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight``, stop-gradient."""
    nll_norm = jnp.sqrt(jnp.sum(jnp.square(nll_grad.astype(jnp.float32))))
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g_grad.astype(jnp.float32))))
    w = jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, 1e4)
    return jax.lax.stop_gradient(w * disc_weight)


def grouped_head_grads(conv_out: Callable, h: jax.Array, conv_params: dict, nll_fn: Callable, g_fn: Callable | None,
                       factor: jax.Array, group_size: int, disc_weight: float = DISC_WEIGHT):
    """The decoder loss gradient at conv_out, with each group's adaptive weight, in one backward pass.

    The authors train on 8 GPUs with DDP: each GPU takes the adaptive weight
    `||d nll_k/dW|| / (||d g_k/dW|| + 1e-4)` from its own images k (W: conv_out's kernel; autograd.grad
    is not all-reduced), and the update is the mean over GPUs of each one's gradient. With groups of
    `group_size` images standing for the GPUs, that mean is the gradient of
    `nll + mean_k(w_k * factor * g_k)`: nll is the same either way (a sum over images / batch),
    and each image's cotangent at conv_out's output carries its own group's `w_k / groups`.

    `conv_out(h, conv_params)` is the decoder's conv_out; `nll_fn(x_rec)` the batch's NLL (sum / batch);
    `g_fn(x_rec)` each group's generator loss, shape [groups] (discriminator statistics per group).
    Returns x_rec, nll, the groups' g and weights, and the cotangents of h and conv_params. Before
    disc_start (factor 0) nothing of the discriminator runs; with `g_fn` None it is not compiled.
    """
    batch = h.shape[0]
    groups = batch // group_size
    x_rec, conv_vjp = jax.vjp(conv_out, h, conv_params)
    nll, nll_vjp = jax.vjp(nll_fn, x_rec)
    d_nll = nll_vjp(jnp.ones((), nll.dtype))[0]

    def per_group_kernel_grad(d):  # d(sum over a group's images of <d, x_rec>)/dW, one per group: [groups, ...]
        split = lambda a: a.reshape((groups, group_size) + a.shape[1:])  # noqa: E731
        grad = lambda hk, dk: jax.vjp(lambda p: conv_out(hk, p), conv_params)[1](dk)[0]["kernel"]  # noqa: E731
        return jax.vmap(grad)(split(h), split(d))

    def gan_on():
        g, g_vjp = jax.vjp(g_fn, x_rec)
        d_g = g_vjp(jnp.ones_like(g))[0]  # each image's slice is the gradient of its own group's g
        # nll_k, the group's own mean, is groups x its share of the batch's nll.
        w = jax.vmap(adaptive_weight_from_grads, (0, 0, None))(
            groups * per_group_kernel_grad(d_nll), per_group_kernel_grad(d_g), disc_weight)
        return g.astype(jnp.float32), w, d_g

    def gan_off():
        zeros = jnp.zeros((groups,), jnp.float32)
        return zeros, zeros, jnp.zeros_like(x_rec)

    g, w, d_g = gan_off() if g_fn is None else jax.lax.cond(factor > 0, gan_on, gan_off)
    coef = jnp.repeat(factor * w / groups, group_size).reshape((batch,) + (1,) * (x_rec.ndim - 1))
    d_h, d_params = conv_vjp((d_nll + coef * d_g).astype(x_rec.dtype))
    return x_rec, nll, g, w, d_h, d_params


def generator_total_loss(nll: jax.Array, kl: jax.Array, g_loss: jax.Array,
                         d_weight: jax.Array, factor: jax.Array,
                         kl_weight: float = KL_WEIGHT) -> jax.Array:
    """``nll + kl_weight * kl + mean(d_weight * g_loss) * disc_factor`` (LDM's generator loss; the mean
    over groups, when g_loss and d_weight hold one value per group, is the authors' DDP average)."""
    return nll + kl_weight * kl + factor * jnp.mean(d_weight * g_loss)

