"""The weight converter: round trips, diffusers interop, LDM / Asymmetric_VQGAN layouts, bad input."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from asymvq_jax.convert import (CorruptFileError, KeyMismatchError, PickleNotAllowedError,  # noqa: E402
                                ShapeMismatchError, UnknownFormatError, from_pretrained, read_checkpoint,
                                save_pretrained)
from asymvq_jax.convert import keys as K  # noqa: E402
from asymvq_jax.convert import writers  # noqa: E402
from asymvq_jax.models.config import VAEConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny shapes; channels stay multiples of 32 so that bare LDM files (no config) infer cleanly.
ASYM_KW = dict(down_block_types=["DownEncoderBlock2D"] * 4, down_block_out_channels=[32, 32, 64, 64],
               layers_per_down_block=1, up_block_types=["UpDecoderBlock2D"] * 4,
               up_block_out_channels=[32, 64, 64, 64], layers_per_up_block=2, latent_channels=4,
               norm_num_groups=32)
PLAIN_KW = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32)


def randomize(model, seed):
    # Non-trivial norms and biases too, so a swapped scale/bias would show.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def asym_torch():
    return randomize(diffusers.AsymmetricAutoencoderKL(**ASYM_KW), 0)


@pytest.fixture(scope="module")
def plain_torch():
    return randomize(diffusers.AutoencoderKL(**PLAIN_KW), 1)


@pytest.fixture(scope="module")
def asym_dir(asym_torch, tmp_path_factory):
    d = tmp_path_factory.mktemp("asym") / "diffusers"
    asym_torch.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plain_dir(plain_torch, tmp_path_factory):
    d = tmp_path_factory.mktemp("plain") / "diffusers"
    plain_torch.save_pretrained(d)
    return d


def _numpy_sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# -- an independent LDM mapping (written for the tests, not the rule under test) ------------------

def independent_to_ldm(sd: dict, n_up: int) -> dict:
    """diffusers -> LDM by plain string edits; checked against diffusers' own converter below."""
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            n = n.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
        n = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", n)
        n = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", n)
        n = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.", n)
        n = n.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        n = n.replace("decoder.condition_encoder.", "decoder.encoder.")
        if ".attn_1." in n and n.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[n] = v
    return out


def test_independent_mapping_agrees_with_diffusers_converter(plain_torch):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    sd = plain_torch.state_dict()
    ldm = independent_to_ldm(sd, 4)
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, dict(plain_torch.config))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k].reshape(sd[k].shape), sd[k]), k


# -- the key rule ----------------------------------------------------------------------------------

def test_key_rule_is_its_own_inverse(asym_torch):
    sd = _numpy_sd(asym_torch)
    ldm_expected = independent_to_ldm(sd, 4)
    for k, v in sd.items():
        ldm = K.diffusers_to_ldm_key(k, 4)
        assert ldm in ldm_expected, (k, ldm)
        assert K.ldm_to_diffusers_key(ldm, 4) == k
        np.testing.assert_array_equal(K.diffusers_to_ldm_array(k, v), ldm_expected[ldm])
        path, arr = K.diffusers_to_flax(k, v)
        assert path[-1] in ("kernel", "scale", "bias") and all(isinstance(p, (str, int)) for p in path)
        k2, v2 = K.flax_to_diffusers(path, arr)
        assert k2 == k and v2.dtype == v.dtype
        np.testing.assert_array_equal(v2, v)
    assert K.diffusers_to_flax("encoder.conv_in.weight", np.zeros((32, 3, 3, 3)))[1].shape == (3, 3, 3, 32)
    assert K.diffusers_to_flax("decoder.mid_block.attentions.0.to_out.0.weight", np.zeros((64, 32)))[0] == (
        "decoder", "mid_block", "attentions", 0, "to_out", 0, "kernel")
    assert K.diffusers_to_flax("decoder.conv_norm_out.weight", np.zeros(4))[0][-1] == "scale"


def test_model_paths_follow_the_rule(asym_torch):
    from flax import nnx
    from asymvq_jax.convert.api import abstract_model, expected_shapes
    sd = _numpy_sd(asym_torch)
    cfg = VAEConfig.from_diffusers_config(dict(asym_torch.config, _class_name="AsymmetricAutoencoderKL"))
    _, abstract = abstract_model(cfg)
    expected = expected_shapes(abstract)
    ours = dict(K.diffusers_to_flax(k, v) for k, v in sd.items())
    assert set(expected) == set(ours)
    assert all(expected[p] == ours[p].shape for p in expected)
    assert isinstance(abstract, nnx.Module)


# -- round trips -----------------------------------------------------------------------------------

def _assert_same(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_diffusers_roundtrip_bit_exact(asym_dir, asym_torch, tmp_path):
    vae = from_pretrained(asym_dir)
    save_pretrained(vae, tmp_path / "ours", format="asymvq")
    assert sorted(os.listdir(tmp_path / "ours")) == ["asymvq_config.json", "params.safetensors"]
    vae2 = from_pretrained(tmp_path / "ours")
    assert vae2.config == vae.config
    save_pretrained(vae2, tmp_path / "back", format="diffusers")
    _assert_same(load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors"), _numpy_sd(asym_torch))
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["_class_name"] == "AsymmetricAutoencoderKL" and "_diffusers_version" in cfg
    for k in ("up_block_out_channels", "down_block_out_channels", "layers_per_up_block", "latent_channels"):
        assert cfg[k] == asym_torch.config[k], k
    # our single-file variant carries its config in the metadata
    save_pretrained(vae2, tmp_path / "one.safetensors", format="asymvq")
    assert from_pretrained(tmp_path / "one.safetensors").config == vae.config


@pytest.mark.parametrize("kind", ["plain", "asym"])
def test_ldm_roundtrip_bit_exact(kind, plain_torch, asym_torch, tmp_path, caplog):
    model = plain_torch if kind == "plain" else asym_torch
    ldm = independent_to_ldm(_numpy_sd(model), 4)
    src = tmp_path / "src.safetensors"
    save_file(ldm, src)  # no metadata: the config is inferred from shapes
    with caplog.at_level(logging.INFO):
        vae = from_pretrained(src)
    assert ("asymmetric-vqgan" if kind == "asym" else "format ldm") in caplog.text
    assert vae.config.asymmetric == (kind == "asym")
    save_pretrained(vae, tmp_path / "out.safetensors", format="ldm")
    _assert_same(load_file(tmp_path / "out.safetensors"), ldm)
    from safetensors import safe_open
    with safe_open(tmp_path / "out.safetensors", framework="numpy") as f:
        assert f.metadata()["format"] == "pt"


def test_asymmetric_vqgan_lightning_checkpoint(asym_torch, tmp_path, caplog):
    ldm = {k: torch.from_numpy(v) for k, v in independent_to_ldm(_numpy_sd(asym_torch), 4).items()}
    junk = {f"decoder.up_layers.{i}.deconv.weight": torch.zeros(8, 8, 4, 4) for i in range(4)}
    junk.update({f"decoder.up_layers.{i}.deconv.bias": torch.zeros(8) for i in range(4)})
    junk.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
                 "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3)})
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {**ldm, **junk}, "global_step": 120030, "epoch": 3}, ckpt)
    with caplog.at_level(logging.INFO):
        vae = from_pretrained(ckpt, allow_pickle=True)
    assert "dropped 11 keys" in caplog.text
    assert "decoder.up_layers" in caplog.text and "loss.discriminator" in caplog.text
    save_pretrained(vae, tmp_path / "diff", format="diffusers")
    _assert_same(load_file(tmp_path / "diff" / "diffusion_pytorch_model.safetensors"), _numpy_sd(asym_torch))


def test_full_sd_checkpoint_keeps_only_the_vae(plain_torch, tmp_path, caplog):
    ldm = independent_to_ldm(_numpy_sd(plain_torch), 4)
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((8, 4, 3, 3), np.float32)
    full["cond_stage_model.transformer.x.weight"] = np.zeros((2, 2), np.float32)
    save_file(full, tmp_path / "sd.safetensors")
    with caplog.at_level(logging.INFO):
        vae = from_pretrained(tmp_path / "sd.safetensors")
    assert "dropped 2 keys" in caplog.text
    save_pretrained(vae, tmp_path / "vae.safetensors", format="ldm")
    _assert_same(load_file(tmp_path / "vae.safetensors"), ldm)


def test_match_preset_ignores_the_latent_family():
    from asymvq_jax.convert import match_preset
    from asymvq_jax.models.config import FAMILIES, PRESETS
    assert match_preset(PRESETS["asym-x1.5"].replace(scaling_factor=0.13025)) == "asym-x1.5"
    assert match_preset(PRESETS["asym-base"].replace(**FAMILIES["flux"])) == "asym-base"
    assert match_preset(VAEConfig(layers_per_up_block=4)) == "custom"


# -- diffusers interop -----------------------------------------------------------------------------

def _torch_decode(model, z, image=None, mask=None):
    with torch.no_grad():
        if image is None:
            return model.decode(z).sample.numpy()
        return model.decode(z, image=image, mask=mask).sample.numpy()


def test_exported_folder_loads_in_diffusers_and_matches(asym_dir, asym_torch, plain_dir, plain_torch, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1
    z = torch.randn(1, 4, 4, 4, generator=g)
    for src, ref, cls in ((asym_dir, asym_torch, diffusers.AsymmetricAutoencoderKL),
                          (plain_dir, plain_torch, diffusers.AutoencoderKL)):
        out = tmp_path / cls.__name__
        save_pretrained(from_pretrained(src), out, format="diffusers")
        loaded, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        loaded.eval()
        with torch.no_grad():
            np.testing.assert_array_equal(loaded.encode(x).latent_dist.mean.numpy(),
                                          ref.encode(x).latent_dist.mean.numpy())
        if cls is diffusers.AsymmetricAutoencoderKL:
            np.testing.assert_array_equal(_torch_decode(loaded, z, x, mask), _torch_decode(ref, z, x, mask))
        else:
            np.testing.assert_array_equal(_torch_decode(loaded, z), _torch_decode(ref, z))


def test_imported_weights_give_diffusers_outputs_in_jax(asym_dir, asym_torch):
    """Checks the Flax layouts (HWIO, (in, out), scale) that a bit-exact round trip cannot see."""
    import jax.numpy as jnp
    vae = from_pretrained(asym_dir)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:20, 8:28] = 1
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        mean_ref = asym_torch.encode(x).latent_dist.mean.numpy()
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    mean = np.asarray(vae.encode(nhwc(x)).mean).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(mean, mean_ref, atol=2e-4, rtol=1e-3)
    dec = np.asarray(vae.decode(nhwc(z), nhwc(x), nhwc(mask))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(dec, _torch_decode(asym_torch, z, x, mask), atol=2e-4, rtol=1e-3)


def _tiny_tokenizer(folder):
    from transformers import CLIPTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def test_exported_vae_works_in_inpaint_pipeline(asym_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    save_pretrained(from_pretrained(asym_dir), tmp_path / "vae", format="diffusers")
    vae = diffusers.AsymmetricAutoencoderKL.from_pretrained(tmp_path / "vae")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=60, max_position_embeddings=77, projection_dim=32))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder.eval(), tokenizer=_tiny_tokenizer(tokenizer_dir),
        scheduler=diffusers.DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # the pipeline takes [0, 1]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    seen = {}

    def keep_latents(pipe, step, t, tensors):  # the last step's latents are the ones the pipeline decodes
        seen["latents"] = tensors["latents"].clone()
        return tensors

    out = pipe(prompt="a cat", image=image, mask_image=mask, height=64, width=64, num_inference_steps=2,
               guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0),
               callback_on_step_end=keep_latents).images
    assert out.shape == (1, 64, 64, 3)

    from asymvq_jax import inference
    ours = from_pretrained(tmp_path / "vae")
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    z = nhwc(seen["latents"]) / ours.config.scaling_factor
    ours = np.asarray(inference.decode(ours, z, nhwc(image) * 2 - 1, nhwc(mask)))
    known = nhwc(mask)[0, ..., 0] == 0
    np.testing.assert_allclose(out[0][known], np.clip(ours[0] / 2 + 0.5, 0, 1)[known], atol=2e-4, rtol=1e-3)


# -- bad input -------------------------------------------------------------------------------------

def test_unknown_format(tmp_path):
    save_file({"foo.bar.weight": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(UnknownFormatError, match="no known VAE layout"):
        from_pretrained(tmp_path / "x.safetensors")
    (tmp_path / "x.npz").write_bytes(b"12")
    with pytest.raises(UnknownFormatError, match="unknown file type"):
        from_pretrained(tmp_path / "x.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormatError, match="config.json"):
        from_pretrained(tmp_path / "empty")


def _diffusers_file(model, tmp_path, edit):
    sd = _numpy_sd(model)
    edit(sd)
    path = tmp_path / "edited"
    path.mkdir(exist_ok=True)
    save_file(sd, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps(dict(model.config, _class_name=type(model).__name__)))
    return path


def test_missing_and_unexpected_keys_are_listed(asym_torch, tmp_path):
    def edit(sd):
        del sd["decoder.up_blocks.1.resnets.2.conv1.weight"]
        del sd["encoder.conv_in.bias"]
        sd["decoder.extra.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(KeyMismatchError) as e:
        from_pretrained(_diffusers_file(asym_torch, tmp_path, edit))
    assert e.value.missing == ["decoder.up_blocks.1.resnets.2.conv1.weight", "encoder.conv_in.bias"]
    assert e.value.unexpected == ["decoder.extra.weight"]
    assert "decoder.up_blocks.1.resnets.2.conv1.weight" in str(e.value) and "decoder.extra.weight" in str(e.value)


def test_shape_mismatch_is_named(asym_torch, tmp_path):
    def edit(sd):
        sd["decoder.conv_out.weight"] = np.zeros((3, 32, 5, 5), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"decoder\.conv_out\.weight: expected \(3, 32, 3, 3\), got \(3, 32, 5, 5\)"):
        from_pretrained(_diffusers_file(asym_torch, tmp_path, edit))


def test_truncated_and_corrupt_files_are_named(asym_dir, tmp_path):
    data = (asym_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        from_pretrained(bad)
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        from_pretrained(bad)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"a": torch.zeros(100)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="cut.ckpt"):
        from_pretrained(ckpt, allow_pickle=True)


def test_pickle_needs_opt_in(plain_torch, tmp_path):
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {k: v for k, v in plain_torch.state_dict().items()}}, ckpt)
    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True") as e:
        from_pretrained(ckpt)
    assert "arbitrary code" in str(e.value)
    with pytest.raises(PickleNotAllowedError):
        read_checkpoint(tmp_path / "vae.ckpt")


def test_failed_export_leaves_nothing(asym_dir, tmp_path, monkeypatch):
    vae = from_pretrained(asym_dir)
    real = writers._save_safetensors

    def half_then_fail(path, tensors, metadata):
        real(path, dict(list(tensors.items())[:3]), metadata)
        raise OSError("disk full")
    monkeypatch.setattr(writers, "_save_safetensors", half_then_fail)
    for fmt, name in (("diffusers", "d"), ("ldm", "l.safetensors"), ("asymvq", "a")):
        with pytest.raises(OSError, match="disk full"):
            save_pretrained(vae, tmp_path / name, format=fmt)
    assert os.listdir(tmp_path) == []
    # an existing export survives a failed overwrite untouched
    monkeypatch.setattr(writers, "_save_safetensors", real)
    save_pretrained(vae, tmp_path / "d", format="diffusers")
    before = (tmp_path / "d" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(writers, "_save_safetensors", half_then_fail)
    with pytest.raises(OSError):
        save_pretrained(vae, tmp_path / "d", format="diffusers")
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d"]
    with pytest.raises(ValueError, match="unknown export format"):
        save_pretrained(vae, tmp_path / "z", format="onnx")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_pretrained(vae, tmp_path / "z", format="ldm")
    assert sorted(os.listdir(tmp_path)) == ["d"]


# -- CLI -------------------------------------------------------------------------------------------

def test_cli(asym_dir, asym_torch, tmp_path, capsys):
    """One run as a command; the rest through main(argv) in this process."""
    import convert_weights
    r = subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), "import", str(asym_dir),
                        str(tmp_path / "ours")], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    with pytest.raises(SystemExit) as stopped:
        convert_weights.main(["export", "--help"])
    h = capsys.readouterr().out
    assert stopped.value.code == 0 and "diffusers" in h and "ldm" in h and "--allow-pickle" in h
    assert convert_weights.main(["export", str(tmp_path / "ours"), str(tmp_path / "vae.safetensors"),
                                 "--format", "ldm"]) == 0
    _assert_same(load_file(tmp_path / "vae.safetensors"), independent_to_ldm(_numpy_sd(asym_torch), 4))
    torch.save(asym_torch.state_dict(), tmp_path / "x.bin")
    capsys.readouterr()
    assert convert_weights.main(["export", str(tmp_path / "x.bin"), str(tmp_path / "out"), "--format", "diffusers"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- detection and other sources ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd", "asym-base", "asym-x1.5", "asym-x2"])
def test_presets_are_detected_from_shapes(name):
    """Shapes only (zero-stride arrays): every published size is inferred and named."""
    from asymvq_jax.convert.api import _dkey, abstract_model, expected_shapes
    from asymvq_jax.convert.readers import infer_config, match_preset
    from asymvq_jax.models.config import PRESETS
    _, abstract = abstract_model(PRESETS[name])
    shapes = {_dkey(p): K.flax_shape_to_diffusers(p, s) for p, s in expected_shapes(abstract).items()}
    fake = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
    cfg = infer_config(fake)
    assert cfg == PRESETS[name]
    assert match_preset(cfg) == name


def test_diffusers_bin_folder_and_legacy_attention_names(plain_torch, tmp_path):
    folder = tmp_path / "bin"
    plain_torch.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(PickleNotAllowedError):
        from_pretrained(folder)
    vae = from_pretrained(folder, allow_pickle=True)
    save_pretrained(vae, tmp_path / "out", format="diffusers")
    _assert_same(load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors"), _numpy_sd(plain_torch))
    # pre-0.14 diffusers attention names (query/key/value/proj_attn) still load
    legacy = {}
    for k, v in _numpy_sd(plain_torch).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    save_file(legacy, tmp_path / "legacy.safetensors")
    save_pretrained(from_pretrained(tmp_path / "legacy.safetensors"), tmp_path / "out2", format="diffusers")
    _assert_same(load_file(tmp_path / "out2" / "diffusion_pytorch_model.safetensors"), _numpy_sd(plain_torch))


def test_dtypes(asym_dir, asym_torch, tmp_path):
    import jax.numpy as jnp
    from asymvq_jax.convert import model_params
    vae = from_pretrained(asym_dir, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert {v.dtype for v in model_params(vae).values()} == {np.dtype(jnp.bfloat16)}
    save_pretrained(vae, tmp_path / "bf16", format="asymvq")
    assert from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16).config == vae.config
    vae32 = from_pretrained(asym_dir)
    save_pretrained(vae32, tmp_path / "fp16", format="diffusers", dtype=np.float16)
    assert {v.dtype for v in load_file(tmp_path / "fp16" / "diffusion_pytorch_model.safetensors").values()} == {
        np.dtype(np.float16)}
    loaded = diffusers.AsymmetricAutoencoderKL.from_pretrained(tmp_path / "fp16", torch_dtype=torch.float16)
    ref = asym_torch.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float16
        assert torch.equal(v, ref[k].half()), k
    # fp16 in, float32 params out: exact
    back = from_pretrained(tmp_path / "fp16")
    assert all(v.dtype == np.float32 for v in model_params(back).values())


# -- destinations and permissions --------------------------------------------------------------------

def tree_hashes(root) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mode)} of every file and folder under `root`."""
    import hashlib
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            data = open(p, "rb").read() if os.path.isfile(p) else b""
            out[os.path.relpath(p, root)] = (hashlib.sha256(data).hexdigest(), os.stat(p).st_mode)
    return out


def _unrelated_folder(root):
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "config.json").write_text('{"not": "a model"}')
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return root


def test_converter_refuses_destinations_that_overlap_or_are_not_its_own(asym_dir, tmp_path, capsys):
    import convert_weights
    src = tmp_path / "models" / "vae"
    import shutil
    shutil.copytree(asym_dir, src)
    unrelated = _unrelated_folder(tmp_path / "unrelated")
    cases = [("export", src, src, "diffusers", "the same place as"),
             ("export", src, src.parent, "diffusers", "a folder holding"),
             ("export", src, src / "inside", "diffusers", "inside"),
             ("import", src, src.parent, None, "a folder holding"),
             ("export", src, unrelated, "diffusers", "is not a diffusers export"),
             ("import", src, unrelated, None, "is not an asymvq export"),
             ("export", src, unrelated / "notes.txt", "ldm", "is not a .safetensors file")]
    for force in (False, True):
        for command, s, d, fmt, why in cases:
            if force and why.startswith("is not"):
                continue  # --force lets those through (tested below)
            before = tree_hashes(tmp_path)
            argv = [command, str(s), str(d)] + (["--format", fmt] if fmt else []) + (["--force"] if force else [])
            assert convert_weights.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and why in err and str(d) in err, (argv, err)
            assert tree_hashes(tmp_path) == before, argv


def test_force_replaces_only_the_files_the_export_writes(asym_dir, plain_dir, tmp_path):
    import convert_weights
    out = tmp_path / "out"
    assert convert_weights.main(["export", str(asym_dir), str(out), "--format", "diffusers"]) == 0
    first = tree_hashes(out)
    # a previous export of the same format is replaced without --force
    assert convert_weights.main(["export", str(plain_dir), str(out), "--format", "diffusers"]) == 0
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert tree_hashes(out).keys() == first.keys() and tree_hashes(out) != first
    # --force into an unrelated folder: its own files stay as they were
    unrelated = _unrelated_folder(tmp_path / "unrelated")
    before = tree_hashes(unrelated)
    assert convert_weights.main(["import", str(asym_dir), str(unrelated), "--force"]) == 0
    after = tree_hashes(unrelated)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == ["asymvq_config.json", "params.safetensors"]
    assert from_pretrained(unrelated).config.asymmetric
    # single files: a previous ldm export is replaced, an asymvq file is not an ldm export
    one = tmp_path / "one.safetensors"
    for fmt, code in (("ldm", 0), ("ldm", 0), ("asymvq", 2)):
        assert convert_weights.main(["export", str(asym_dir), str(one), "--format", fmt]) == code, fmt


def test_fresh_export_is_readable_by_other_users(asym_dir):
    """Under umask 022: folders drwxr-xr-x, files -rw-r--r--, and an unprivileged user loads it."""
    import shutil
    import tempfile
    top = tempfile.mkdtemp(prefix="asymvq-perm-")  # pytest's tmp_path is private to its owner
    os.chmod(top, 0o755)
    old = os.umask(0o022)
    try:
        for fmt, out in (("diffusers", "d"), ("asymvq", "a"), ("ldm", "l.safetensors")):
            save_pretrained(from_pretrained(asym_dir), os.path.join(top, out), format=fmt)
    finally:
        os.umask(old)
    try:
        modes = {os.path.relpath(os.path.join(d, n), top): os.stat(os.path.join(d, n)).st_mode & 0o777
                 for d, dirs, files in os.walk(top) for n in dirs + files}
        assert modes == {"d": 0o755, "d/config.json": 0o644, "d/diffusion_pytorch_model.safetensors": 0o644,
                         "a": 0o755, "a/asymvq_config.json": 0o644, "a/params.safetensors": 0o644,
                         "l.safetensors": 0o644}, modes
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip("loading as another user needs root and setpriv")
        code = ("import diffusers, sys; diffusers.AsymmetricAutoencoderKL.from_pretrained(sys.argv[1]); "
                "print(open(sys.argv[1] + '/config.json').read()[:1])")
        env = dict(os.environ, HOME=top, HF_HOME=os.path.join(top, "hf"), HF_HUB_OFFLINE="1")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            code, os.path.join(top, "d")], capture_output=True, text=True, env=env, cwd=top)
        if "Operation not permitted" in r.stderr and "setpriv" in r.stderr:
            pytest.skip("setpriv cannot switch users here")
        assert r.returncode == 0 and r.stdout.strip() == "{", r.stderr[-2000:]
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("case", ["missing key", "wrong type", "a list", "nan weights", "zero groups"])
def test_malformed_config_or_weights_is_one_line_naming_the_key(asym_dir, tmp_path, capsys, case):
    import shutil

    import convert_weights
    src = tmp_path / "src"
    shutil.copytree(asym_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    if case == "missing key":
        del cfg["up_block_out_channels"]
        expected = r"config.json: missing key up_block_out_channels: expected a list"
    elif case == "wrong type":
        cfg["latent_channels"] = "four"
        expected = r'config.json: latent_channels="four": expected a positive integer'
    elif case == "a list":
        cfg = []
        expected = r"config.json: expected a JSON object \{...\}, got list \[\]"
    elif case == "zero groups":
        cfg["norm_num_groups"] = 0
        expected = r"config.json: norm_num_groups=0: expected a positive integer"
    else:
        tensors = load_file(src / "diffusion_pytorch_model.safetensors")
        tensors["decoder.conv_out.bias"][1] = np.nan
        save_file(tensors, src / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        expected = r"1 tensors hold NaN or Inf \(decoder.conv_out.bias\)"
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert_weights.main(["export", str(src), str(tmp_path / "out"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(expected, err) and str(src) in err, err
    assert not (tmp_path / "out").exists()
