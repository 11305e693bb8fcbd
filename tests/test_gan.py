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
    conv_out_apply,
    disc_factor,
    generator_loss,
    generator_total_loss,
    hinge_d_loss,
    reconstruction_nll,
    weighted_head_grads,
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


def test_reconstruction_nll_and_kl():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    r = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    p = rng.uniform(0, 1, (3,)).astype(np.float32)
    # LDM: rec = |x - r| + w * p (per image, broadcast); nll = rec (logvar 0); sum / B
    want = (np.abs(x - r) + p[:, None, None, None]).sum() / 3
    np.testing.assert_allclose(float(reconstruction_nll(jnp.asarray(x), jnp.asarray(r), jnp.asarray(p))), want, rtol=1e-6)
    np.testing.assert_allclose(float(reconstruction_nll(jnp.asarray(x), jnp.asarray(r))), np.abs(x - r).sum() / 3, rtol=1e-6)
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


@pytest.mark.parametrize("factor", [1.0, 0.0])
def test_head_gradients_equal_naive_full_gradients(factor):
    """The train step's one-pass gradient against the naive form: the adaptive weight from two
    full gradients w.r.t. the conv_out kernel, then the full gradient of the total loss."""
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 8)
    cin, cmid = 4, 16
    params = {
        "conv_in_k": jax.random.normal(ks[0], (3, 3, cin, cmid)) * 0.3,
        "conv_in_b": jax.random.normal(ks[1], (cmid,)) * 0.1,
        "gn_s": 1.0 + 0.1 * jax.random.normal(ks[2], (cmid,)),
        "gn_b": 0.1 * jax.random.normal(ks[3], (cmid,)),
        "conv_out_k": jax.random.normal(ks[4], (3, 3, cmid, 3)) * 0.1,
        "conv_out_b": jax.random.normal(ks[5], (3,)) * 0.1,
    }
    z = jax.random.normal(ks[6], (2, 16, 16, cin))
    x = jax.random.uniform(ks[7], (2, 16, 16, 3), minval=-1, maxval=1)

    def features(p):  # everything before conv_out
        h = conv_out_apply(z, p["conv_in_k"], p["conv_in_b"])
        return jax.nn.silu(_group_norm(h, p["gn_s"], p["gn_b"], groups=4))

    def decoder(p):
        return conv_out_apply(features(p), p["conv_out_k"], p["conv_out_b"])

    rng = np.random.default_rng(0)
    lp = LPIPS({k: (rng.normal(size=s) * np.sqrt(2.0 / np.prod(s[:-1]))).astype(np.float32)
                if k.startswith("trunk") and k.endswith("kernel") else
                (np.abs(rng.normal(size=s)) * 0.1).astype(np.float32)
                for k, s in expected_shapes().items()})
    disc_def, disc_state = nnx.split(NLayerDiscriminator(ndf=8, rngs=nnx.Rngs(0)))  # train mode
    disc_state = nnx.to_pure_dict(disc_state)  # fresh variables at each merge: no cross-trace mutation

    def nll_fn(r):
        return reconstruction_nll(x, r, lp(x, r))

    def g_fn(r):
        return generator_loss(nnx.merge(disc_def, disc_state)(r))

    @jax.jit
    def naive(p):
        g_nll = jax.grad(lambda q: nll_fn(decoder(q)))(p)["conv_out_k"]
        g_g = jax.grad(lambda q: g_fn(decoder(q)))(p)["conv_out_k"]
        d_weight = factor * 0.8 * jnp.clip(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4), 0, 1e4)
        total = jax.grad(lambda q: nll_fn(decoder(q)) + d_weight * factor * g_fn(decoder(q)))(p)
        return d_weight, total

    @jax.jit
    def fast(p):
        h, body_vjp = jax.vjp(features, p)
        _, head_vjp = jax.vjp(lambda h, k, b: (nll_fn(conv_out_apply(h, k, b)), g_fn(conv_out_apply(h, k, b))),
                              h, p["conv_out_k"], p["conv_out_b"])
        d_weight, (gh, gk, gb) = weighted_head_grads(head_vjp, jnp.float32(factor), 0.8)
        grads = body_vjp(gh)[0]
        return d_weight, {**grads, "conv_out_k": gk, "conv_out_b": gb}

    (want_w, want), (got_w, got) = naive(params), fast(params)
    assert float(want_w) > 0 or factor == 0
    np.testing.assert_allclose(float(got_w), float(want_w), rtol=1e-5, atol=1e-6)
    for name in params:
        scale = float(jnp.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
