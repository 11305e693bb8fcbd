"""PatchGAN parity with a PyTorch NLayerDiscriminator (reference written here from the
SPEC layout: taming's n_layers=3 PatchGAN with BatchNorm), train-mode BatchNorm, same
weights; checks logits, running stats after updates, eval mode, and the init stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asymvq_jax.losses.discriminator import NLayerDiscriminator

torch = pytest.importorskip("torch")
nn = torch.nn


def torch_reference(ndf=8, n_layers=3):
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2 ** n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                   nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
               nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*layers)


def copy_into_torch(d: NLayerDiscriminator, ref: "nn.Sequential"):
    convs = [m for m in ref if isinstance(m, nn.Conv2d)]
    bns = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(d.convs) and len(bns) == len(d.norms)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    with torch.no_grad():
        for c, fc in zip(convs, d.convs):
            c.weight.copy_(t(np.asarray(fc.kernel[...]).transpose(3, 2, 0, 1)))
            if c.bias is not None:
                c.bias.copy_(t(fc.bias[...]))
            else:
                assert fc.bias is None
        for b, fb in zip(bns, d.norms):
            b.weight.copy_(t(fb.scale[...]))
            b.bias.copy_(t(fb.bias[...]))
            b.running_mean.copy_(t(fb.mean[...]))
            b.running_var.copy_(t(fb.var[...]))
    return bns


def test_layout_and_init():
    d = NLayerDiscriminator(rngs=nnx.Rngs(0))
    shapes = [tuple(c.kernel.shape) for c in d.convs]
    assert shapes == [(4, 4, 3, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512), (4, 4, 512, 1)]
    assert [c.bias is not None for c in d.convs] == [True, False, False, False, True]
    assert [c.strides for c in d.convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    k = np.concatenate([np.asarray(c.kernel[...]).ravel() for c in d.convs[1:4]])
    assert abs(k.mean()) < 1e-3 and abs(k.std() - 0.02) < 1e-3
    s = np.concatenate([np.asarray(b.scale[...]) for b in d.norms])
    assert abs(s.mean() - 1.0) < 5e-3 and abs(s.std() - 0.02) < 5e-3
    assert all(float(jnp.abs(b.bias[...]).max()) == 0.0 for b in d.norms)
    b0 = np.asarray(d.convs[0].bias[...])
    assert np.abs(b0).max() <= 1 / np.sqrt(3 * 16)  # torch default conv bias init
    y = d(jnp.zeros((1, 256, 256, 3)))
    assert y.shape == (1, 30, 30, 1)


def test_parity_train_mode_and_running_stats():
    ndf = 8
    d = NLayerDiscriminator(ndf=ndf, rngs=nnx.Rngs(1))
    ref = torch_reference(ndf).train()
    bns = copy_into_torch(d, ref)
    rng = np.random.default_rng(0)
    step = nnx.jit(lambda m, x: m(x))
    for i in range(3):  # several updates: running stats accumulate identically
        x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
        got = np.asarray(step(d, jnp.asarray(x)))
        with torch.no_grad():
            want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        assert got.shape == want.shape == (2, 6, 6, 1)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        for b, fb in zip(bns, d.norms):
            np.testing.assert_allclose(np.asarray(fb.mean[...]), b.running_mean.numpy(), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(fb.var[...]), b.running_var.numpy(), atol=1e-5, rtol=1e-5)
    # eval mode uses the running stats and leaves them alone
    d.eval()
    ref.eval()
    before = [np.asarray(fb.var[...]).copy() for fb in d.norms]
    x = rng.uniform(-1, 1, (3, 48, 48, 3)).astype(np.float32)
    got = np.asarray(d(jnp.asarray(x)))
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for bv, fb in zip(before, d.norms):
        np.testing.assert_array_equal(bv, np.asarray(fb.var[...]))


def test_gradients_match_torch():
    ndf = 8
    d = NLayerDiscriminator(ndf=ndf, rngs=nnx.Rngs(2))
    ref = torch_reference(ndf).train()
    copy_into_torch(d, ref)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    gx = nnx.grad(lambda m, a: jnp.mean(jax.nn.relu(1.0 - m(a))), argnums=1)(d, jnp.asarray(x))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
    torch.relu(1.0 - ref(xt)).mean().backward()
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6, rtol=1e-4)


def test_taming_referee_per_gpu_statistics_and_losses():
    """taming-transformers (what the authors import) as a third-party referee, same weights and inputs:
    our discriminator with groups of 2 images equals theirs run on each GPU's 2 images, and the hinge
    loss and adopt_weight agree."""
    taming = pytest.importorskip("taming.modules.discriminator.model")
    vq = pytest.importorskip("taming.modules.losses.vqperceptual")
    ours = NLayerDiscriminator(ndf=16, rngs=nnx.Rngs(3))
    ref = taming.NLayerDiscriminator(input_nc=3, ndf=16, n_layers=3).train()
    copy_into_torch(ours, ref.main)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(4, 64, 64, 3)).astype(np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        want = torch.cat([ref(nchw(x[:2])), ref(nchw(x[2:]))]).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours(jnp.asarray(x), group_size=2))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The losses on the same logits, exactly (eighths: every partial sum is exact in float32, so
    # neither side's summation order can round).
    real, fake = (rng.integers(-24, 24, size=want.shape) / 8).astype(np.float32), (np.round(want * 8) / 8)
    theirs = float(vq.hinge_d_loss(torch.from_numpy(real), torch.from_numpy(fake)))
    from asymvq_jax.losses.gan import disc_factor, hinge_d_loss
    assert float(hinge_d_loss(jnp.asarray(real), jnp.asarray(fake))) == theirs
    for step in (0, 50000, 50001, 50002):
        assert float(disc_factor(step, 50001, 1.0)) == vq.adopt_weight(1.0, step, threshold=50001)
