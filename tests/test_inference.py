"""The inference module and decode.py: jit = eager, tiling, memory, files in and PNG out, bad input."""

import collections
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import decode as decode_cli
import asymvq_jax
from asymvq_jax import inference, save_pretrained
from asymvq_jax.files import read_image, read_mask
from asymvq_jax.models import VAEConfig
from asymvq_jax.models.blocks import attend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                  up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, norm_num_groups=8)


def random_model(config, seed=0):
    """Random weights without running the initialisers op by op (slow on a busy CPU)."""
    from asymvq_jax.convert.api import abstract_model, build_model, expected_shapes
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in expected_shapes(abstract_model(config)[1]).items():
        if len(shape) > 1:  # kernels: fan-in scaled
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # norm scales near 1, biases near 0
            value = (path[-1] == "scale") + 0.1 * rng.normal(size=shape)
        params[path] = value.astype(np.float32)
    return build_model(config, params)


@pytest.fixture(scope="module")
def vae():
    return random_model(SMALL)


def inputs(size, batch=1, seed=0, width=None):
    width = width or size
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (1, size, width, 3)).astype(np.float32)
    mask = np.zeros((1, size, width, 1), np.float32)
    mask[:, size // 4: 3 * size // 4, width // 8: width // 2] = 1.0
    z = rng.normal(size=(batch, size // 8, width // 8, 4)).astype(np.float32)
    return x, mask, z


# Not bit for bit. Convolutions, upsampling, SiLU and the blend give the same bits jitted as op by op;
# GroupNorm does not: under jit XLA fuses the subtraction and square into the variance's reduction
# and sums in another order (shape-dependent), so each norm's output moves by up to ~2.6e-7 of its
# largest value (1.2e-6 absolute; `test_jitted_group_norms_within_1e_6`). 22 norms in a row carry
# that to 7.2e-6 on decoded values up to 4.1 (batch 3, guided); the bound is about 3x that.
JIT_TOL = 2e-5


def test_jitted_group_norms_within_1e_6(vae, monkeypatch):
    """Every GroupNorm of a guided decode, jitted on the input it saw op by op: within 1e-6 of its scale."""
    x, mask, z = inputs(32, batch=3)
    seen, call = [], nnx.GroupNorm.__call__
    monkeypatch.setattr(nnx.GroupNorm, "__call__", lambda norm, a: seen.append((norm, a)) or call(norm, a))
    vae.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask))
    monkeypatch.undo()
    jitted = nnx.jit(lambda norm, a: norm(a))
    assert len(seen) == 22
    for norm, a in seen:
        eager = norm(a)
        assert float(jnp.max(jnp.abs(jitted(norm, a) - eager))) <= 1e-6 * float(jnp.max(jnp.abs(eager)))


def test_jitted_equals_eager_and_compiles_once(vae):
    x, mask, z = inputs(32, batch=3)
    eager = vae.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask))  # batch-1 image against 3 latents
    before = inference._decode._cache_size()
    for seed in range(3):
        z = inputs(32, batch=3, seed=seed)[2]
        jitted = inference.decode(vae, z, x, mask)
        if seed == 0:
            np.testing.assert_allclose(jitted, eager, atol=JIT_TOL, rtol=0)
    assert inference._decode._cache_size() == before + 1
    np.testing.assert_allclose(inference.encode(vae, x), vae.encode(jnp.asarray(x)).mode(), atol=JIT_TOL, rtol=0)
    np.testing.assert_allclose(inference.decode(vae, z), vae.decode(jnp.asarray(z)), atol=JIT_TOL, rtol=0)


def test_bfloat16_compute(vae):
    x, mask, z = inputs(32)
    bf16 = asymvq_jax.load(vae, dtype="bfloat16")
    out = inference.decode(bf16, z, x, mask)
    assert out.dtype == jnp.bfloat16
    ref = inference.decode(vae, z, x, mask)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_chunked_attention_memory_is_linear_in_pixels():
    n, c = 8192, 32  # a 90x90 latent: the full logits alone would take n*n*4 = 256 MiB
    q = jax.ShapeDtypeStruct((1, n, c), jnp.float32)
    temp = jax.jit(attend).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    assert temp < 3 * 1024 * n * 4, temp  # a few 1024-query chunks of logits
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 1100, 16)).astype(np.float32)) for _ in range(3))
    full = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / 4.0, axis=-1) @ v
    np.testing.assert_allclose(attend(q, k, v, chunk=256), full, atol=1e-5)


def test_chunked_attention_matches_diffusers(monkeypatch):
    """Parity of the whole model with 16-query chunks (36 latent pixels: three chunks, one padded)."""
    pytest.importorskip("diffusers")
    import torch

    from asymvq_jax.models import blocks
    from tests.torch_reference import diffusers_vae, flax_from_torch, to_nchw, to_nhwc
    monkeypatch.setattr(blocks, "ATTENTION_CHUNK", 16)
    ref = diffusers_vae(SMALL)
    ours = flax_from_torch(SMALL, ref)
    x, mask, z = inputs(48)
    with torch.no_grad():
        expected = to_nhwc(ref.decode(to_nchw(z), image=to_nchw(x), mask=to_nchw(mask)).sample)
        mean = to_nhwc(ref.encode(to_nchw(x)).latent_dist.mean)
    with jax.default_matmul_precision("highest"):
        assert np.abs(np.asarray(inference.decode(ours, z, x, mask)) - expected).max() < 1e-4
        assert np.abs(np.asarray(inference.encode(ours, x)) - mean).max() < 1e-4


# -- tiling ------------------------------------------------------------------------------------

def test_tile_starts_cover_with_overlap():
    for size, tile, overlap in [(28, 16, 4), (100, 64, 16), (64, 64, 16), (257, 32, 8)]:
        starts = inference.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_core_bounds_split_the_overlaps_in_the_middle():
    assert inference.core_bounds([0, 8], 16, 24) == [(0, 12), (12, 24)]
    assert inference.core_bounds([0, 6, 12], 16, 28) == [(0, 11), (11, 17), (17, 28)]
    assert inference.core_bounds([0], 20, 20) == [(0, 20)]


def test_one_tile_equals_untiled(vae):
    """With a single tile the stage-by-stage path is the untiled decode, GroupNorms and all."""
    x, mask, z = inputs(64)
    for cond in [(None, None), (x, mask)]:
        full = np.asarray(inference.decode(vae, z, *cond))
        np.testing.assert_allclose(inference.decode_tiled(vae, z, *cond, tile=8, overlap=2), full, atol=JIT_TOL)


# Measured on random weights, latents and image (printed with -s). The GroupNorms use the whole image's
# statistics, so tiles differ only where a convolution sees a tile's zero padding: the core's edge,
# overlap/2 = 4 latent pixels from the border, and through the statistics taken there. Seen: away from
# seams 1.4e-4 / 2.7e-4 (mean), in the overlap band 3.0e-3 / 4.9e-3 (mean), 0.054 / 0.24 (max: one pixel
# where the mask's edge meets the cut). Bounds: about 1.5x. (mean away from seams, band mean, band max)
BOUNDS = {"plain": (2e-4, 5e-3, 0.08), "guided": (4e-4, 8e-3, 0.36)}


@pytest.mark.parametrize("kind", ["plain", "guided"])
def test_tiled_decode_matches_untiled_without_seams(vae, kind):
    x, mask, z = inputs(192)  # latent 24: two 16-tiles per axis, overlapping on latent rows 8..15, cut at 12
    cond = (x, mask) if kind == "guided" else (None, None)
    full = np.asarray(inference.decode(vae, z, *cond))
    tiled = inference.decode_tiled(vae, z, *cond, tile=16, overlap=8)
    err = np.abs(tiled - full).max(-1)[0]
    seam = np.zeros(err.shape, bool)
    seam[64:128], seam[:, 64:128] = True, True  # the overlap band (pixels), both axes
    far, at_seam = err[~seam], err[seam]
    print(f"{kind} tiled vs untiled: away from seams mean {far.mean():.1e} max {far.max():.1e}; seam band "
          f"mean {at_seam.mean():.1e} max {at_seam.max():.1e} (output std {full.std():.2f})")
    far_mean, seam_mean, seam_max = BOUNDS[kind]
    assert far.mean() < far_mean and at_seam.mean() < seam_mean and at_seam.max() < seam_max
    # No visible seam: the image does not step where one tile's pixels give way to the next's.
    for axis in (0, 1):
        step = np.abs(np.diff(tiled[0], axis=axis)).mean((1 - axis, 2))[95]
        ref_step = np.abs(np.diff(full[0], axis=axis)).mean((1 - axis, 2))[95]
        assert abs(step - ref_step) < 0.02 * ref_step, (axis, step, ref_step)


def lowered(fn) -> collections.Counter:
    """Runs fn; counts the programs jax lowered meanwhile, by name (each one a compile, or at best a
    persistent-cache lookup)."""
    names = collections.Counter()

    def listen(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            names[fun_name] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return names


def test_tiled_decode_compiles_once_per_segment_shape():
    """Segments of one kind and shape share a program. With three ResNets per level (as in the presets)
    the 26 segments take 14: the blend after the mid block, then per level a first half, a second half
    and the last second half (which upsamples and blends), and a first half with a shortcut where the
    width changes (the last level here); the output norm runs with conv_out. A second decode, or more
    tiles of the same size, compile nothing new but the mid block (which runs on the whole latent); a
    plain decode after a guided one compiles only the segments that blend."""
    vae = random_model(SMALL.replace(layers_per_up_block=2))
    x, mask, z = inputs(160)  # latent 20: 2x2 tiles of 12, a size no other test here decodes (jit caches are global)
    decoder = [f"jit({name})" for name in ("_tile_segment", "_tile_output", "_branch_features", "_decode_mid")]
    guided = lambda: inference.decode_tiled(vae, z, x, mask, tile=12, overlap=4)
    first = lowered(guided)
    print("tiled decode, 2x2 tiles:", dict(first))
    assert len(vae.decoder.segments()) == 26
    assert [first[name] for name in decoder] == [1 + 3 + 3 + 3 + 4, 1, 1, 1]
    assert not any(lowered(guided)[n] for n in decoder)
    plain = lowered(lambda: inference.decode_tiled(vae, z, tile=12, overlap=4))
    assert {n: c for n, c in plain.items() if n in decoder} == {"jit(_tile_segment)": 1 + 3}
    x, mask, z = inputs(224)  # 3x3 tiles of the same size
    assert {n: c for n, c in lowered(lambda: inference.decode_tiled(vae, z, x, mask, tile=12, overlap=4)).items()
            if n in decoder} == {"jit(_decode_mid)": 1}


@pytest.mark.slow  # a 2048 px decode in a fresh process
def test_2048px_tiled_decode_peak_memory(tmp_path):
    """A mask-guided 2048x2048 decode in 512 px tiles, in a fresh process: peak RSS stays bounded."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from asymvq_jax import inference
        from tests.test_inference import SMALL, random_model
        vae = random_model(SMALL)
        x = np.zeros((2048, 2048, 3), np.float32); m = np.zeros((2048, 2048, 1), np.float32); m[500:1500] = 1
        z = np.random.default_rng(0).normal(size=(1, 256, 256, 4)).astype(np.float32)
        y = inference.decode_images(vae, z, x, m, tile=64)
        assert y.shape == (1, 2048, 2048, 3) and np.isfinite(y).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    peak_mib = int(run.stdout.split()[-1])
    print(f"2048x2048 tiled decode (small model): peak RSS {peak_mib} MiB")
    assert peak_mib < 6000  # 4365-4856 MiB seen here: the host holds one level of the whole image


# -- files and the CLI -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, vae):
    """A saved model, a bundled photo whose size is not a multiple of 8, and a binary mask."""
    import skimage.data
    root = tmp_path_factory.mktemp("cli")
    model = save_pretrained(vae, str(root / "model"), format="diffusers")
    photo = skimage.data.chelsea()[:101, :130]  # 101 x 130: padded to 104 x 136 inside
    Image.fromarray(photo).save(root / "photo.png")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[20:70, 30:90] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return {"root": root, "model": model, "image": str(root / "photo.png"), "mask": str(root / "mask.png")}


def to_uint8(x):
    return np.clip(np.round((x + 1) * 127.5), 0, 255)


def test_reconstruct_cli_writes_side_by_side(files, vae, tmp_path):
    out = tmp_path / "rec.png"
    run = subprocess.run([sys.executable, "decode.py", "reconstruct", "--model", files["model"], "--image",
                          files["image"], "--mask", files["mask"], "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    written = np.asarray(Image.open(out)).astype(int)
    assert written.shape == (101, 4 * 130, 3)
    image, mask = read_image(files["image"]), read_mask(files["mask"])
    plain, guided = inference.reconstruct(vae, image, mask)
    expected = np.concatenate([image, image * (1 - mask), plain, guided], axis=1)
    assert np.abs(written - to_uint8(expected)).max() <= 1


def test_decode_cli_scaled_latents_in_torch_layout(files, vae, tmp_path):
    image, mask = read_image(files["image"]), read_mask(files["mask"])
    z = np.random.default_rng(1).normal(size=(2, 13, 17, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", (z * SMALL.scaling_factor).transpose(0, 3, 1, 2))  # as a sampler saves them
    out = tmp_path / "out.png"
    assert decode_cli.main(["decode", "--model", files["model"], "--latents", str(tmp_path / "z.npy"), "--scaled",
                            "--image", files["image"], "--mask", files["mask"], "--out", str(out)]) == 0
    expected = inference.decode_images(vae, z, image, mask)
    for i in range(2):
        written = np.asarray(Image.open(tmp_path / f"out_{i}.png")).astype(int)
        assert np.abs(written - to_uint8(expected[i])).max() <= 1
    assert not out.exists()


def bad_inputs(files, tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 13, 17), np.float32))
    np.save(tmp_path / "z_bad.npy", np.zeros((1, 4, 12, 17), np.float32))
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(tmp_path / "small_mask.png")
    grey = np.zeros((101, 130), np.uint8)
    grey[10:20] = 128
    Image.fromarray(grey).save(tmp_path / "grey_mask.png")
    latents, out = ["--latents", str(tmp_path / "z.npy"), "--unscaled"], ["--out", str(tmp_path / "out.png")]
    model, image, mask = ["--model", files["model"]], ["--image", files["image"]], ["--mask", files["mask"]]
    return {
        "missing image": (["reconstruct", *model, "--image", str(tmp_path / "nope.png"), *mask, *out], "nope.png"),
        "missing model": (["reconstruct", "--model", str(tmp_path / "nomodel"), *image, *mask, *out], "nomodel"),
        "latent shape": (["decode", *model, "--latents", str(tmp_path / "z_bad.npy"), "--unscaled", *image, *mask,
                          *out], r"latents have shape \(1, 12, 17, 4\)"),
        "mask size": (["decode", *model, *latents, *image, "--mask", str(tmp_path / "small_mask.png"), *out],
                      "mask is 60x50 pixels but the image is 130x101"),
        "non-binary mask": (["decode", *model, *latents, *image, "--mask", str(tmp_path / "grey_mask.png"), *out],
                            "not binary"),
    }


@pytest.mark.parametrize("case", ["missing image", "missing model", "latent shape", "mask size", "non-binary mask"])
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(files, tmp_path, capsys, case):
    argv, message = bad_inputs(files, tmp_path)[case]
    before = set(os.listdir(tmp_path))
    assert decode_cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert set(os.listdir(tmp_path)) == before


def test_load_model_from_training_workdir(vae, tmp_path):
    from asymvq_jax import checkpoint
    params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    decoder = {"decoder": params.pop("decoder")}
    mgr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mgr, 5, {"params": decoder}, params, force=True)
    mgr.wait_until_finished()
    checkpoint.write_model_config(str(tmp_path), SMALL)
    loaded = asymvq_jax.load(str(tmp_path))
    x, mask, z = inputs(32)
    np.testing.assert_array_equal(inference.decode(loaded, z, x, mask), inference.decode(vae, z, x, mask))

    config = tmp_path / "model_config.json"
    config.write_text(config.read_text().replace("{", '{"colour": 1, ', 1))
    with pytest.raises(ValueError, match=r"model_config.json: unknown keys \['colour'\]"):
        asymvq_jax.load(str(tmp_path))


def test_cli_output_never_replaces_an_input_or_a_non_image(files, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    keep = {p: open(p, "rb").read() for p in (files["image"], files["mask"], notes)}
    common = ["reconstruct", "--model", files["model"], "--image", files["image"], "--mask", files["mask"]]
    for out, extra, message in ((files["image"], ["--force"], "the same place as the source"),
                                (files["model"], ["--force"], "the same place as the source"),
                                (files["root"], [], "a folder holding the source"),
                                (str(notes), [], "exists and is not an image")):
        assert decode_cli.main(common + ["--out", str(out)] + extra) == 2
        assert re.search(message, capsys.readouterr().err), out
    assert {p: open(p, "rb").read() for p in keep} == keep
