"""Parity with diffusers (0.42) on random weights, float32 at highest matmul precision.

Tolerance: 1e-4 max abs on outputs in [-1, 1]-scale; the values reached are printed with -s.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asymvq_jax.models import AutoencoderKL, VAEConfig, preset
from asymvq_jax.models.condition import downsample_mask

TOL = 1e-4
SMALL_ASYM = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                       up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, norm_num_groups=8)
SMALL_SD = SMALL_ASYM.replace(asymmetric=False, up_block_out_channels=(32, 32, 64, 64))


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def ref():
    """The torch reference (diffusers' models and layout helpers): parity tests skip without the torch
    extra, the JAX-only tests here run."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests import torch_reference
    return torch_reference


def inputs(batch, size, latent_channels=4, seed=0, factor=8):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    mask[:, size // 4: 3 * size // 4, size // 8: size // 2] = 1.0
    z = rng.normal(size=(batch, size // factor, size // factor, latent_channels)).astype(np.float32)
    return x, mask, z


def assert_close(name, ours, ref, tol=TOL):
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    print(f"{name}: max abs err {err:.2e}")
    assert err < tol, f"{name}: max abs err {err} >= {tol}"


def check_parity(ref, config, size, batch=2, masked=True):
    import torch
    theirs = ref.diffusers_vae(config)
    ours = ref.flax_from_torch(config, theirs)
    x, mask, z = inputs(batch, size, config.latent_channels, factor=ours.downscale)
    with torch.no_grad():
        post = theirs.encode(ref.to_nchw(x)).latent_dist
        plain = theirs.decode(ref.to_nchw(z)).sample
        if masked:
            guided = theirs.decode(ref.to_nchw(z), image=ref.to_nchw(x), mask=ref.to_nchw(mask)).sample
    ours_post = ours.encode(jnp.asarray(x))
    assert_close("encoder mean", ours_post.mean, ref.to_nhwc(post.mean))
    assert_close("encoder logvar", ours_post.logvar, ref.to_nhwc(post.logvar))
    assert_close("plain decode", ours.decode(jnp.asarray(z)), ref.to_nhwc(plain))
    if masked:
        assert_close("masked decode", ours.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask)),
                     ref.to_nhwc(guided))


def test_small_asymmetric_parity(ref):
    check_parity(ref, SMALL_ASYM, 64)


def test_small_plain_parity(ref):
    check_parity(ref, SMALL_SD, 32, masked=False)


def test_three_level_asymmetric_parity(ref):
    """An f4 decoder (the local default's): the stride-16 branch's coarsest feature goes unused."""
    three = SMALL_ASYM.replace(down_block_out_channels=(32, 64, 64), up_block_out_channels=(32, 64, 64))
    check_parity(ref, three, 32)


@pytest.mark.parametrize("widths, words", [((32, 64, 64, 64, 64), "at most 4 levels"),
                                           ((32, 32, 64, 64), r"\[64, 64, 64, 32, 32\].*\[64, 64, 64, 64, 32\]")])
def test_asymmetric_widths_the_branch_cannot_blend_raise(widths, words):
    with pytest.raises(ValueError, match=words):
        SMALL_ASYM.replace(up_block_out_channels=widths)


def test_sixteen_latent_channels_parity(ref):
    check_parity(ref, SMALL_ASYM.replace(latent_channels=16), 32)


def test_batch_one_condition_broadcasts_to_latent_batch(ref):
    import torch
    theirs = ref.diffusers_vae(SMALL_ASYM)
    ours = ref.flax_from_torch(SMALL_ASYM, theirs)
    x, mask, z = inputs(3, 32)
    x, mask = x[:1], mask[:1]
    with torch.no_grad():  # diffusers needs the repeated batch (a batch-1 image raises KeyError there)
        expected = theirs.decode(ref.to_nchw(z), image=ref.to_nchw(np.repeat(x, 3, 0)),
                                 mask=ref.to_nchw(np.repeat(mask, 3, 0))).sample
    assert_close("broadcast decode", ours.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask)),
                 ref.to_nhwc(expected))


def test_all_ones_mask_is_plain_decoding():
    ours = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(1))
    x, mask, z = inputs(2, 32)
    guided = ours.decode(jnp.asarray(z), jnp.asarray(x), jnp.ones_like(mask))
    np.testing.assert_allclose(guided, ours.decode(jnp.asarray(z)), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=np.zeros((2, 32, 32, 3)), mask=None), "both image and mask"),
    (dict(image=np.zeros((2, 32, 32, 3)), mask=np.zeros((2, 16, 16, 1))), r"mask has shape \(2, 16, 16, 1\)"),
    (dict(image=np.zeros((2, 32, 32, 3)), mask=np.zeros((3, 32, 32, 1))), "mask batch 3"),
    (dict(image=np.zeros((2, 32, 32, 4)), mask=np.zeros((2, 32, 32, 1))), "image has shape"),
])
def test_bad_condition_shapes_raise(kwargs, message):
    ours = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        ours.decode(jnp.zeros((2, 4, 4, 4)), **kwargs)


def test_plain_decoder_rejects_condition():
    ours = AutoencoderKL(SMALL_SD, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no masked-image branch"):
        ours.decode(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 1)))


def test_mask_downsampling_matches_torch_nearest(ref):
    import torch
    mask = (np.random.default_rng(0).uniform(size=(2, 64, 64, 1)) > 0.5).astype(np.float32)
    for size in (32, 16, 8):
        theirs = torch.nn.functional.interpolate(ref.to_nchw(mask), size=(size, size), mode="nearest")
        np.testing.assert_array_equal(downsample_mask(mask, size), ref.to_nhwc(theirs))


def millions(module) -> float:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))) / 1e6


@pytest.mark.parametrize("name, main, branch", [
    ("sd", 49.49, None), ("asym-base", 49.49, 10.79), ("asym-x1.5", 135.87, 24.27), ("asym-x2", 328.83, 43.13)])
def test_parameter_counts_match_paper(name, main, branch):
    model = nnx.eval_shape(lambda: AutoencoderKL(preset(name), rngs=nnx.Rngs(0)))
    branch_params = millions(model.decoder.condition_encoder) if branch is not None else 0.0
    assert millions(model.encoder) == pytest.approx(34.16, abs=0.005)
    assert millions(model.decoder) - branch_params == pytest.approx(main, abs=0.005)
    # 0.01M: SPEC's 24.27M for the x1.5 branch is 24.2646M exactly (as in diffusers' own model).
    assert branch_params == pytest.approx(branch or 0.0, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd", "asym-x1.5", "asym-x2"])
def test_full_preset_parity(ref, name):
    check_parity(ref, preset(name), 16, batch=1, masked=name != "sd")


def test_remat_keeps_values_and_gradients():
    x, mask, z = inputs(1, 32)
    plain = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(3))
    remat = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(3), remat=True)

    def grads(model):
        return nnx.grad(lambda m: jnp.mean(m.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask)) ** 2))(model)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_stays_close_to_float32():
    x, mask, z = inputs(2, 32)
    f32 = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(4))
    bf16 = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(4), dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ref = f32.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask))
    out = bf16.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref))), err


def test_blend_gaps_leave_the_decode_unchanged_and_train_only_the_branch():
    """`Decoder.up`'s gaps: the decoder's features and the branch feature at every blend, the output the
    same; gan.branch_gap, the loss on them, is zero where the two agree and its gradient reaches the
    branch's parameters alone."""
    from asymvq_jax import checkpoint
    from asymvq_jax.losses.gan import branch_gap
    vae = AutoencoderKL(SMALL_ASYM, rngs=nnx.Rngs(0))
    x, mask, z = (jnp.asarray(a) for a in inputs(2, 32))
    graphdef, params = nnx.split(vae, nnx.Param)

    def features(p, gap_weight):
        model, gaps = nnx.merge(graphdef, p), []
        h = model.decoder_features(z, x, mask, gaps)
        return jnp.mean(jnp.square(h)) + gap_weight * branch_gap(gaps, mask), (h, gaps)

    grad_fn = jax.jit(jax.value_and_grad(features, has_aux=True))
    (_, (h, gaps)), grads = grad_fn(params, 0.0)
    np.testing.assert_allclose(h, vae.decoder_features(z, x, mask), atol=TOL)  # jit against eager
    branch = vae.decoder.branch_features(x, mask)
    assert len(gaps) == len(branch) == len(vae.decoder.up_blocks) + 1
    for (own, cond), want in zip(gaps, branch):
        assert own.shape == cond.shape and float(jnp.abs(own - cond).max()) > 0.1
        np.testing.assert_allclose(cond, want, atol=TOL)
    # The gap counts the known region only: the branch's side copied there from the decoder's closes it.
    closed = [(own, jnp.where(downsample_mask(mask, own.shape[1]) > 0, own + 1.0, own)) for own, _ in gaps]
    assert float(branch_gap(gaps, mask)) > 0.1 and float(branch_gap(closed, mask)) == 0.0

    without, with_gap = (checkpoint.flatten(nnx.to_pure_dict(g)) for g in (grads, grad_fn(params, 10.0)[1]))
    moved = {k for k in without if not np.array_equal(without[k], with_gap[k])}
    assert moved and all(k.startswith("decoder.condition_encoder.") for k in moved), sorted(moved)
