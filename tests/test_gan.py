"""GAN/NLL/KL terms and the adaptive GAN weight.

The adaptive weight is checked against the naive computation (two full gradients of the
whole decoder-like network w.r.t. its conv_out kernel), with a real (random-weight) LPIPS
in the NLL and a train-mode PatchGAN in the generator loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asymvq_jax.losses.discriminator import NLayerDiscriminator
from asymvq_jax.losses.gan import (
    adaptive_weight_from_grads,
    disc_factor,
    generator_loss,
    generator_total_loss,
    grouped_head_grads,
    hinge_d_loss,
    hole_border,
    reconstruction_nll,
)
from asymvq_jax.losses.lpips import LPIPS, expected_shapes
from asymvq_jax.models import DiagonalGaussian


def test_hinge_and_generator_loss():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(2, 6, 6, 1)).astype(np.float32) * 2
    fake = rng.normal(size=(2, 6, 6, 1)).astype(np.float32) * 2
    want = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(float(hinge_d_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=1e-6)
    np.testing.assert_allclose(float(generator_loss(jnp.asarray(fake))), -fake.mean(), rtol=1e-6)


def test_hole_border_is_the_band_on_both_sides_of_the_border():
    mask = np.zeros((2, 10, 10, 1), np.float32)
    mask[0, 3:6, 4:8] = 1        # a hole inside the image
    mask[1, :, :5] = 1           # a hole reaching the image's edge: the edge is no border
    band = np.asarray(hole_border(jnp.asarray(mask), 1))[..., 0]
    want = np.zeros((2, 10, 10))
    want[0, 2:7, 3:9] = 1
    want[0, 4, 5:7] = 0          # the hole's inside, more than 1 px from its border
    want[1, :, 4:6] = 1
    np.testing.assert_array_equal(band, want)
    assert not np.asarray(hole_border(jnp.ones((1, 6, 6, 1)), 2)).any()   # all hole: no border


def test_reconstruction_nll_and_kl():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    r = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    p = rng.uniform(0, 1, (3,)).astype(np.float32)
    # LDM: rec = |x - r| + w * p (per image, broadcast); nll = rec (logvar 0); sum / B
    want = (np.abs(x - r) + p[:, None, None, None]).sum() / 3
    np.testing.assert_allclose(float(reconstruction_nll(jnp.asarray(x), jnp.asarray(r), jnp.asarray(p))), want, rtol=1e-6)
    np.testing.assert_allclose(float(reconstruction_nll(jnp.asarray(x), jnp.asarray(r))), np.abs(x - r).sum() / 3, rtol=1e-6)
    w = rng.uniform(0, 3, (3, 8, 8, 1)).astype(np.float32)  # per pixel, on the L1 term only
    want_w = (w * np.abs(x - r) + p[:, None, None, None]).sum() / 3
    np.testing.assert_allclose(float(reconstruction_nll(jnp.asarray(x), jnp.asarray(r), jnp.asarray(p), jnp.asarray(w))),
                               want_w, rtol=1e-6)
    m = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    lv = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    want_kl = (0.5 * (m ** 2 + np.exp(lv) - 1 - lv)).sum() / 3
    kl = jnp.mean(DiagonalGaussian(jnp.asarray(m), jnp.asarray(lv)).kl())  # what the train step takes
    np.testing.assert_allclose(float(kl), want_kl, rtol=1e-5)
    tot = generator_total_loss(jnp.float32(2.0), jnp.float32(1e3), jnp.float32(-0.5), jnp.float32(0.8), jnp.float32(1.0))
    np.testing.assert_allclose(float(tot), 2.0 + 1e-3 - 0.4, rtol=1e-6)


def test_disc_factor_under_jit():
    f = jax.jit(lambda s: disc_factor(s, 50001))
    for s, want in [(0, 0.0), (50000, 0.0), (50001, 1.0), (120030, 1.0)]:
        assert float(f(jnp.int32(s))) == want
    assert float(jax.jit(lambda s: disc_factor(s, 10, factor=0.5))(jnp.int32(11))) == 0.5


def test_adaptive_weight_clip_and_stopgrad():
    assert float(adaptive_weight_from_grads(jnp.ones(4), jnp.zeros(4), 1.0)) == pytest.approx(1e4)
    assert float(adaptive_weight_from_grads(jnp.zeros(4), jnp.ones(4), 0.8)) == 0.0
    np.testing.assert_allclose(float(adaptive_weight_from_grads(jnp.full(4, 3.0), jnp.full(4, 1.5), 0.8)),
                               0.8 * 6.0 / (3.0 + 1e-4), rtol=1e-6)
    g = jax.grad(lambda a: adaptive_weight_from_grads(a, 2 * a))(jnp.ones(3))
    assert float(jnp.abs(g).max()) == 0.0


def _group_norm(h, scale, bias, groups, eps=1e-6):
    b, hh, ww, c = h.shape
    g = h.reshape(b, hh, ww, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / jnp.sqrt(var + eps)
    return g.reshape(b, hh, ww, c) * scale + bias


def conv(h, kernel, bias):
    return jax.lax.conv_general_dilated(h, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize("factor, group", [(1.0, 2), (1.0, 4)])  # 4: one group, the whole batch
def test_grouped_head_gradients_equal_the_authors_ddp_arithmetic(factor, group):
    """The train step's one-pass gradient against the authors' DDP arithmetic, computed naively: each
    group (one GPU) takes its adaptive weight from two full gradients of its own losses w.r.t. the
    conv_out kernel, with the discriminator's statistics over its own images, then the gradient of
    its own total loss; the update is the mean of the groups' gradients."""
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 8)
    cin, cmid, batch = 4, 16, 4
    params = {
        "conv_in_k": jax.random.normal(ks[0], (3, 3, cin, cmid)) * 0.3,
        "conv_in_b": jax.random.normal(ks[1], (cmid,)) * 0.1,
        "gn_s": 1.0 + 0.1 * jax.random.normal(ks[2], (cmid,)),
        "gn_b": 0.1 * jax.random.normal(ks[3], (cmid,)),
        "conv_out": {"kernel": jax.random.normal(ks[4], (3, 3, cmid, 3)) * 0.1,
                     "bias": jax.random.normal(ks[5], (3,)) * 0.1},
    }
    z = jax.random.normal(ks[6], (batch, 16, 16, cin))
    x = jax.random.uniform(ks[7], (batch, 16, 16, 3), minval=-1, maxval=1)

    def features(p, z):  # everything before conv_out
        h = conv(z, p["conv_in_k"], p["conv_in_b"])
        return jax.nn.silu(_group_norm(h, p["gn_s"], p["gn_b"], groups=4))

    def conv_out(h, q):
        return conv(h, q["kernel"], q["bias"])

    rng = np.random.default_rng(0)
    lp = LPIPS({k: (rng.normal(size=s) * np.sqrt(2.0 / np.prod(s[:-1]))).astype(np.float32)
                if k.startswith("trunk") and k.endswith("kernel") else
                (np.abs(rng.normal(size=s)) * 0.1).astype(np.float32)
                for k, s in expected_shapes().items()})
    disc_def, disc_state = nnx.split(NLayerDiscriminator(ndf=8, rngs=nnx.Rngs(0)))  # train mode
    disc_state = nnx.to_pure_dict(disc_state)  # fresh variables at each merge: no cross-trace mutation

    def nll_fn(x, r):
        return reconstruction_nll(x, r, lp(x, r))

    def g_fn(r):  # the discriminator sees only the images it is given: one GPU's
        return generator_loss(nnx.merge(disc_def, disc_state)(r))

    @jax.jit
    def authors(p):
        grads, weights = [], []
        for k in range(batch // group):  # one GPU each: its own images, its own weight
            zk, xk = z[k * group:(k + 1) * group], x[k * group:(k + 1) * group]
            decode = lambda q: conv_out(features(q, zk), q["conv_out"])  # noqa: E731
            g_nll = jax.grad(lambda q: nll_fn(xk, decode(q)))(p)["conv_out"]["kernel"]
            g_g = jax.grad(lambda q: g_fn(decode(q)))(p)["conv_out"]["kernel"]
            w = factor * 0.8 * jnp.clip(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4), 0, 1e4)
            grads.append(jax.grad(lambda q: nll_fn(xk, decode(q)) + w * factor * g_fn(decode(q)))(p))
            weights.append(w)
        return jnp.stack(weights), jax.tree.map(lambda *g: sum(g) / len(g), *grads)  # DDP: all-reduce mean

    @jax.jit
    def ours(p):
        h, body_vjp = jax.vjp(lambda q: features(q, z), p)

        def group_g(r):
            logits = nnx.merge(disc_def, disc_state)(r, group_size=group)
            return jax.vmap(generator_loss)(logits.reshape((batch // group, group) + logits.shape[1:]))

        _, _, _, w, d_h, d_conv = grouped_head_grads(conv_out, h, p["conv_out"], lambda r: nll_fn(x, r), group_g,
                                                     jnp.float32(factor), group, 0.8)
        return w, {**body_vjp(d_h)[0], "conv_out": d_conv}

    (want_w, want), (got_w, got) = authors(params), ours(params)
    assert (float(want_w.min()) > 0) == (factor > 0)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    for path, a in jax.tree_util.tree_flatten_with_path(want)[0]:
        b = got
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()), err_msg=str(path))
