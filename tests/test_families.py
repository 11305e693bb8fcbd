"""Latent families (SD, SDXL, SD3, FLUX): import from diffusers folders and single files, parity
with diffusers, factors through export and re-import, and the model without quant convs."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from asymvq_jax.convert import UnknownFormatError, from_pretrained, save_pretrained
from asymvq_jax.models import FAMILIES, VAEConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from tests.test_convert import independent_to_ldm, randomize  # noqa: E402

# Tiny widths; 32 norm groups, as a bare single file (no config) is read with the default.
TINY = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32)
# diffusers' config.json values of each family (latent channels, factors, quant convs).
DIFFUSERS_FAMILY = {
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
}
# Today's tolerances (tests/test_convert.py: imported weights against diffusers in JAX).
ATOL, RTOL = 2e-4, 1e-3


@pytest.fixture(scope="module", params=sorted(DIFFUSERS_FAMILY))
def family_vae(request):
    name = request.param
    return name, randomize(diffusers.AutoencoderKL(**TINY, **DIFFUSERS_FAMILY[name]), 3)


def _ldm_tensors(model) -> dict:
    return {k: v.contiguous() for k, v in independent_to_ldm(model.state_dict(), 4).items()}


def _single_file(name, model, folder):
    """The family's own single-file layout: SDXL's sdxl_vae.safetensors (LDM names), FLUX's
    ae.safetensors (BFL: LDM names, no quant convs, no prefix), SD3's whole checkpoint
    (first_stage_model. beside the MMDiT's keys)."""
    ldm = _ldm_tensors(model)
    if name == "sd3":
        ldm = {f"first_stage_model.{k}": v for k, v in ldm.items()}
        ldm["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3, 3)
    path = folder / f"{name}.safetensors"
    save_file(ldm, path)
    return path


def _inputs(channels):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, channels, 4, 4, generator=g)
    return x, z


def _assert_parity(vae, model):
    x, z = _inputs(model.config.latent_channels)
    with torch.no_grad():
        mean_ref = model.encode(x).latent_dist.mean.numpy()
        dec_ref = model.decode(z).sample.numpy()
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    mean = np.asarray(vae.encode(nhwc(x)).mean).transpose(0, 3, 1, 2)
    dec = np.asarray(vae.decode(nhwc(z))).transpose(0, 3, 1, 2)
    print(f"encoder mean max err {np.abs(mean - mean_ref).max():.1e}, decode {np.abs(dec - dec_ref).max():.1e}")
    np.testing.assert_allclose(mean, mean_ref, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(dec, dec_ref, atol=ATOL, rtol=RTOL)


def _assert_family(vae, name):
    cfg = vae.config
    assert cfg.family == name
    for field, value in FAMILIES[name].items():
        assert getattr(cfg, field) == value, field
    assert (vae.quant_conv is None) == (not cfg.use_quant_conv)
    assert (vae.post_quant_conv is None) == (not cfg.use_post_quant_conv)


def test_diffusers_folder_parity(family_vae, tmp_path):
    name, model = family_vae
    model.save_pretrained(tmp_path / "vae")
    vae = from_pretrained(tmp_path)  # a pipeline folder with vae/
    _assert_family(vae, name)
    _assert_parity(vae, model)


def test_single_file_parity(family_vae, tmp_path, caplog):
    name, model = family_vae
    path = _single_file(name, model, tmp_path)
    with caplog.at_level(logging.INFO):
        # SD3's file says its family (its MMDiT keys); SDXL's and FLUX's files must be told.
        vae = from_pretrained(path, family=None if name == "sd3" else name)
    assert f"family {name}" in caplog.text
    _assert_family(vae, name)
    _assert_parity(vae, model)


def test_single_file_family_choice(tmp_path):
    flux = randomize(diffusers.AutoencoderKL(**TINY, **DIFFUSERS_FAMILY["flux"]), 4)
    bare = tmp_path / "ae.safetensors"
    save_file(_ldm_tensors(flux), bare)
    with pytest.raises(UnknownFormatError, match=r"sd3 and flux.*family="):
        from_pretrained(bare)
    assert from_pretrained(bare, family="sd3").config.family == "sd3"
    with pytest.raises(UnknownFormatError, match="latent_channels=4"):
        from_pretrained(bare, family="sdxl")
    sd3 = _single_file("sd3", flux, tmp_path)
    with pytest.raises(UnknownFormatError, match="file says 'sd3'"):
        from_pretrained(sd3, family="flux")
    sdxl = randomize(diffusers.AutoencoderKL(**TINY, **DIFFUSERS_FAMILY["sdxl"]), 5)
    save_file(_ldm_tensors(sdxl), tmp_path / "sdxl_vae.safetensors")
    assert from_pretrained(tmp_path / "sdxl_vae.safetensors").config.family == "sd"  # same shapes as SD
    whole = {f"first_stage_model.{k}": v for k, v in _ldm_tensors(sdxl).items()}
    whole["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(2)
    save_file(whole, tmp_path / "sdxl_base.safetensors")
    assert from_pretrained(tmp_path / "sdxl_base.safetensors").config.family == "sdxl"  # said by its keys
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        from_pretrained(bare, family="sd4")


@pytest.mark.parametrize("name, asymmetric", [("sd", True), ("sdxl", False), ("sd3", False), ("flux", True)])
def test_factors_round_trip_every_format(name, asymmetric, tmp_path):
    """import -> export -> import keeps the factors, the quant convs (or their absence) and the weights."""
    from tests.test_inference import random_model
    cfg = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                    up_block_out_channels=(32, 64, 64, 64) if asymmetric else (32, 32, 64, 64),
                    layers_per_up_block=1, asymmetric=asymmetric, **FAMILIES[name])
    vae = random_model(cfg, seed=2)
    from asymvq_jax.convert import model_params
    for fmt, dst in (("diffusers", "d"), ("ldm", "f.safetensors"), ("asymvq", "a")):
        back = from_pretrained(save_pretrained(vae, tmp_path / dst, format=fmt))
        assert back.config == cfg, fmt
        a, b = model_params(vae), model_params(back)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), fmt


def test_exported_asymmetric_flux_loads_in_diffusers(tmp_path):
    """AsymmetricAutoencoderKL always has quant convs: a FLUX decoder is exported with identity ones,
    and config.json keeps shift_factor for the user."""
    from tests.test_inference import random_model
    cfg = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                    up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, norm_num_groups=8,
                    **FAMILIES["flux"])
    vae = random_model(cfg, seed=5)
    out = save_pretrained(vae, tmp_path / "asym_flux", format="diffusers")
    written = json.loads((tmp_path / "asym_flux" / "config.json").read_text())
    assert written["scaling_factor"] == 0.3611 and written["shift_factor"] == 0.1159
    model, info = diffusers.AsymmetricAutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.scaling_factor == 0.3611
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 8:24, 4:20] = 1
    z = rng.normal(size=(1, 4, 4, 16)).astype(np.float32)
    t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        mean = model.encode(t(x)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        guided = model.decode(t(z), image=t(x), mask=t(mask)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(mean, vae.encode(jnp.asarray(x)).mean, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(guided, vae.decode(jnp.asarray(z), jnp.asarray(x), jnp.asarray(mask)),
                               atol=ATOL, rtol=RTOL)


def test_cli_family(tmp_path):
    import convert_weights
    flux = randomize(diffusers.AutoencoderKL(**TINY, **DIFFUSERS_FAMILY["flux"]), 6)
    save_file(_ldm_tensors(flux), tmp_path / "ae.safetensors")
    assert convert_weights.main(["import", str(tmp_path / "ae.safetensors"), str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()
    assert convert_weights.main(["import", str(tmp_path / "ae.safetensors"), str(tmp_path / "out"),
                                 "--family", "flux"]) == 0
    assert from_pretrained(tmp_path / "out").config.family == "flux"
    # BFL's own layout back: LDM names, no quant convs, no prefix.
    assert convert_weights.main(["export", str(tmp_path / "out"), str(tmp_path / "ae2.safetensors"),
                                 "--format", "ldm"]) == 0
    from safetensors.numpy import load_file
    assert set(load_file(tmp_path / "ae2.safetensors")) == set(_ldm_tensors(flux))


@pytest.mark.slow
def test_sixteen_channels_without_quant_convs_through_inference():
    """A FLUX-family asymmetric model: the batch-1 image/mask broadcast, the mask-guided decode,
    tiling (stage by stage) and bf16 all run without quant convs on 16 channels."""
    from asymvq_jax import inference, load
    from tests.test_inference import JIT_TOL, random_model
    cfg = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                    up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, norm_num_groups=8,
                    **FAMILIES["flux"])
    vae = random_model(cfg, seed=7)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 8:24, 4:16] = 1
    z = np.asarray(inference.encode(vae, np.repeat(x, 2, 0)))
    assert z.shape == (2, 4, 4, 16)
    guided = np.asarray(inference.decode(vae, z, x, mask))
    np.testing.assert_allclose(guided, vae.decode(jnp.asarray(z), jnp.asarray(np.repeat(x, 2, 0)),
                                                  jnp.asarray(np.repeat(mask, 2, 0))), atol=JIT_TOL)
    # One tile: the stage-by-stage tiled path (mid block first) is the untiled decode.
    np.testing.assert_allclose(inference.decode_tiled(vae, z, x, mask, tile=4, overlap=1), guided, atol=JIT_TOL)
    bf16 = inference.decode(load(vae, dtype="bfloat16"), z, x, mask)
    assert bf16.dtype == jnp.bfloat16
    assert 0 < float(np.abs(np.asarray(bf16, np.float32) - guided).max()) < 0.1 * np.abs(guided).max()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_scaled_and_packed_latents_decode_as_unscaled(name, tmp_path):
    """decode.py decode --scaled: what the family's pipeline returns with output_type="latent"
    ((z - shift) * scaling; FLUX's packed into 2x2 patches) decodes as the encoder's own latents."""
    import decode as decode_cli
    from PIL import Image

    from asymvq_jax import files
    from tests.test_inference import random_model
    cfg = VAEConfig(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                    up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, norm_num_groups=8,
                    **FAMILIES[name])
    save_pretrained(random_model(cfg, seed=8), tmp_path / "model", format="asymvq")
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (48, 64, 3)).astype(np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    z = rng.normal(size=(2, 16, 6, 8)).astype(np.float32)  # the encoder's latents, torch layout
    scaled = torch.from_numpy(np.asarray(cfg.scale(z), np.float32))
    if name == "flux":
        scaled = diffusers.FluxPipeline._pack_latents(scaled, 2, 16, 6, 8)
        assert tuple(scaled.shape) == (2, 12, 64)
    np.save(tmp_path / "scaled.npy", scaled.numpy())
    np.save(tmp_path / "z.npy", z)
    np.testing.assert_allclose(cfg.unscale(files.read_latents(tmp_path / "scaled.npy", 16, image_size=(48, 64))),
                               z.transpose(0, 2, 3, 1), atol=1e-6)
    common = ["decode", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "image.png"),
              "--mask", str(tmp_path / "mask.png")]
    assert decode_cli.main(common + ["--latents", str(tmp_path / "scaled.npy"), "--scaled",
                                     "--out", str(tmp_path / "a.png")]) == 0
    assert decode_cli.main(common + ["--latents", str(tmp_path / "z.npy"), "--unscaled",
                                     "--out", str(tmp_path / "b.png")]) == 0
    for i in range(2):
        a, b = (np.asarray(Image.open(tmp_path / f"{s}_{i}.png"), np.int32) for s in "ab")
        assert a.shape == (48, 64, 3) and np.abs(a - b).max() <= 1  # float noise may flip a rounding


@pytest.mark.slow
def test_eval_compares_a_flux_vae_with_an_asymmetric_flux_decoder(tmp_path):
    """eval.py --family flux: FLUX's own file (BFL layout) as the plain baseline against an asymmetric
    decoder built on the same encoder and decoder, whose plain decode must score the same."""
    import eval as eval_cli

    from asymvq_jax.convert import build_model, model_params
    from tests.test_inference import random_model
    widths = dict(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1,
                  up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1, **FAMILIES["flux"])
    plain = random_model(VAEConfig(**widths, asymmetric=False), seed=9)
    save_pretrained(plain, tmp_path / "ae.safetensors", format="ldm")
    asym_cfg = VAEConfig(**widths)
    branch = {p: v for p, v in model_params(random_model(asym_cfg, seed=10)).items() if "condition_encoder" in p}
    save_pretrained(build_model(asym_cfg, {**model_params(plain), **branch}), tmp_path / "asym", format="asymvq")
    # The file alone has no config; ours says flux (tests/test_families.py: single files need the choice).
    from safetensors.numpy import load_file, save_file
    save_file(load_file(tmp_path / "ae.safetensors"), tmp_path / "bare.safetensors")  # no asymvq metadata
    args = ["--decoder", str(tmp_path / "bare.safetensors"), "--decoder", str(tmp_path / "asym"),
            "--data", "bundled_photos", "--limit", "2", "--image_size", "32", "--batch_size", "2", "--lpips", "",
            "--fid_inception", "", "--grids", "1"]
    with pytest.raises(UnknownFormatError, match="sd3 and flux"):
        eval_cli.main(args + ["--out", str(tmp_path / "no")])
    results = eval_cli.main(args + ["--family", "flux", "--out", str(tmp_path / "eval")])
    rows = results["decoders"]
    assert set(rows["asym"]) == {"plain", "guided"} and set(rows["bare.safetensors"]) == {"plain"}
    for metric, value in rows["bare.safetensors"]["plain"].items():
        assert rows["asym"]["plain"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
