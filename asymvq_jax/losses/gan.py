"""Loss terms of the authors' recipe (LDM ``LPIPSWithDiscriminator``), in JAX.

Generator (decoder) step, as in LDM::

    nll      = reconstruction_nll(x, x_rec, lpips(x, x_rec))         # sum / batch
    kl       = kl_loss(post_mean, post_logvar)                        # sum / batch
    g        = generator_loss(D(x_rec))                                # -mean D(x_rec)
    d_weight = adaptive_weight(...) * disc_weight                      # stop-gradient
    loss     = nll + 1e-6 * kl + d_weight * disc_factor(step, disc_start) * g

Discriminator step::

    d_loss = disc_factor(step, disc_start) * hinge_d_loss(D(x), D(stop_gradient(x_rec)))

Images are NHWC in [-1, 1].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

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


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec)))`` (LDM's alternative)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
                  + jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32))))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """``-mean D(x_rec)``."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def disc_factor(step: jax.Array | int, disc_start: int = DISC_START, factor: float = 1.0) -> jax.Array:
    """``factor`` once ``step >= disc_start``, else 0 (LDM ``adopt_weight``).  Uses the
    traced step (``jnp.where``), so one compiled train step serves both phases."""
    return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(factor), jnp.float32(0.0))


# ---------------------------------------------------------------- reconstruction / KL
def reconstruction_nll(
    x: jax.Array,
    x_rec: jax.Array,
    p_loss: jax.Array | None = None,
    *,
    perceptual_weight: float = PERCEPTUAL_WEIGHT,
    logvar: jax.Array | float = 0.0,
) -> jax.Array:
    """The authors' NLL term.

    ``rec = |x - x_rec| + perceptual_weight * p_loss`` with the per-image LPIPS ``p_loss``
    (shape ``[B]``) broadcast over every pixel and channel, ``nll = rec / exp(logvar) +
    logvar`` (logvar stays 0: no optimizer holds it, so ``nll == rec``), then summed over
    C*H*W (and batch) and divided by the batch size.

    The scale matters: summing over C*H*W (196,608 terms at 256x256x3) instead of taking a
    mean makes this term ~2e5 times larger than a mean-L1 loss.  The KL weight 1e-6 is
    calibrated against this sum, and the adaptive GAN weight is the ratio of gradient
    norms ``||grad nll|| / ||grad g||``, so the GAN/reconstruction balance and the 0.8
    ``disc_weight`` only reproduce the paper with exactly this normalisation.  (LPIPS
    enters H*W*C times: once per broadcast pixel.)
    """
    x = x.astype(jnp.float32)
    x_rec = x_rec.astype(jnp.float32)
    rec = jnp.abs(x - x_rec)
    if p_loss is not None and perceptual_weight > 0:
        p = jnp.asarray(p_loss, jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        rec = rec + perceptual_weight * p
    logvar = jnp.asarray(logvar, jnp.float32)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / x.shape[0]


def kl_loss(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over the latent dims, summed over the
    batch and divided by the batch size (LDM ``DiagonalGaussianDistribution.kl``; logvar
    is clipped to [-30, 20] as there).  Weight it with ``KL_WEIGHT`` (1e-6)."""
    mean = mean.astype(jnp.float32)
    logvar = jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
    return jnp.sum(kl) / mean.shape[0]


# -------------------------------------------------------------------- adaptive weight
def adaptive_weight_from_grads(nll_grad: jax.Array, g_grad: jax.Array,
                               disc_weight: float = DISC_WEIGHT) -> jax.Array:
    """``clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight``, stop-gradient."""
    nll_norm = jnp.sqrt(jnp.sum(jnp.square(nll_grad.astype(jnp.float32))))
    g_norm = jnp.sqrt(jnp.sum(jnp.square(g_grad.astype(jnp.float32))))
    w = jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, 1e4)
    return jax.lax.stop_gradient(w * disc_weight)


def stateless(module: nnx.Module) -> Callable[..., jax.Array]:
    """A pure function calling a *copy* of ``module`` (state updates, e.g. BatchNorm
    running stats, are discarded).  ``adaptive_weight`` differentiates ``nll_fn``/``g_fn``
    with an inner ``jax.grad``; NNX refuses to mutate a module's variables from that inner
    trace, so wrap a train-mode discriminator (or LPIPS) with this:
    ``g_fn = lambda r: generator_loss(stateless(disc)(r))``.  The ordinary ``D(x_rec)``
    call of the generator loss still updates the running stats once, as in torch."""
    graphdef, state = nnx.split(module)

    def call(*args, **kwargs):
        return nnx.merge(graphdef, state, copy=True)(*args, **kwargs)

    return call


def conv_out_apply(h: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                   padding=None) -> jax.Array:
    """Stride-1 NHWC/HWIO convolution as the decoder's ``conv_out`` (3x3, pad 1 for SD).
    ``padding`` defaults to ``k // 2`` on each side (explicit, like torch)."""
    if padding is None:
        padding = tuple((k // 2, k // 2) for k in kernel.shape[:2])
    y = jax.lax.conv_general_dilated(
        h.astype(kernel.dtype), kernel, window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if bias is not None:
        y = y + bias
    return y


def adaptive_weight(
    nll_fn: Callable[[jax.Array], jax.Array],
    g_fn: Callable[[jax.Array], jax.Array],
    h: jax.Array,
    conv_out_kernel: jax.Array,
    conv_out_bias: jax.Array | None = None,
    *,
    disc_weight: float = DISC_WEIGHT,
    conv_fn: Callable[..., jax.Array] = conv_out_apply,
) -> jax.Array:
    """LDM's adaptive GAN weight with W = the decoder's ``conv_out`` kernel, computed
    without another backward pass through the decoder.

    Args:
      nll_fn: ``x_rec -> scalar nll`` (e.g. ``lambda r: reconstruction_nll(x, r, lpips(x, r))``).
      g_fn: ``x_rec -> scalar generator loss`` (e.g.
        ``lambda r: generator_loss(stateless(D)(r))``; both functions must be pure, see
        :func:`stateless`).
        Anything the decoder does *after* conv_out (e.g. mask compositing) belongs inside
        these two functions.
      h: the activations entering ``conv_out`` (from the forward pass; gradients are
        stopped here).
      conv_out_kernel, conv_out_bias: the conv_out parameters (HWIO, [C]).
      conv_fn: ``conv_fn(h, kernel, bias) -> x_rec``; defaults to a stride-1 explicit-pad conv.

    Why this is exact: ``x_rec = conv_out(h; W, b)`` and ``h`` does not depend on W, so
    ``d nll / d W = (d nll / d x_rec) . (d x_rec / d W)`` only involves the path
    conv_out -> (LPIPS / D).  Differentiating ``nll_fn(conv_fn(stop_gradient(h), W, b))``
    w.r.t. W gives the same vector as differentiating the whole decoder; the cost is one
    backward through LPIPS and one through D from ``x_rec`` plus two weight-gradient
    convolutions, with no decoder backward.
    """
    h = jax.lax.stop_gradient(h)
    b = None if conv_out_bias is None else jax.lax.stop_gradient(conv_out_bias)
    w = jax.lax.stop_gradient(conv_out_kernel)

    def through(fn):
        return lambda kernel: fn(conv_fn(h, kernel, b))

    nll_grad = jax.grad(through(nll_fn))(w)
    g_grad = jax.grad(through(g_fn))(w)
    return adaptive_weight_from_grads(nll_grad, g_grad, disc_weight)


def generator_total_loss(nll: jax.Array, kl: jax.Array, g_loss: jax.Array,
                         d_weight: jax.Array, factor: jax.Array,
                         kl_weight: float = KL_WEIGHT) -> jax.Array:
    """``nll + kl_weight * kl + d_weight * disc_factor * g_loss`` (LDM generator loss)."""
    return nll + kl_weight * kl + d_weight * factor * g_loss


__all__ = [
    "DISC_WEIGHT", "KL_WEIGHT", "DISC_START", "PERCEPTUAL_WEIGHT",
    "hinge_d_loss", "vanilla_d_loss", "generator_loss", "disc_factor",
    "reconstruction_nll", "kl_loss", "adaptive_weight", "adaptive_weight_from_grads",
    "conv_out_apply", "generator_total_loss", "stateless",
]
