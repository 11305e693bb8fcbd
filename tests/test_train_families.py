"""Training for any latent family: an asymmetric decoder on FLUX latents (encoder and family from
init_from), and a whole autoencoder's own measured factors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from asymvq_jax import checkpoint, from_pretrained, save_pretrained
from asymvq_jax.data import batch_for_step
from asymvq_jax.models import FAMILIES
from asymvq_jax.train.loop import train
from tests.test_train import config

ATOL, RTOL = 2e-4, 1e-3


def _flat(vae, prefix):
    from flax import nnx
    return {k: np.asarray(v) for k, v in checkpoint.flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items()
            if k.startswith(prefix)}


@pytest.mark.slow
def test_asymmetric_decoder_on_flux_latents(assets, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    # A random FLUX-configured VAE with the tiny config's encoder widths.
    torch.manual_seed(0)
    flux = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=16,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    flux.save_pretrained(tmp_path / "flux")
    workdir = tmp_path / "run"
    train(config(assets, total_steps=2, eval_every=0, init_from=str(tmp_path / "flux")), str(workdir))

    trained, source = checkpoint.load(str(workdir)), from_pretrained(tmp_path / "flux")
    assert trained.config.family == "flux" and trained.config.asymmetric
    assert trained.quant_conv is None and trained.post_quant_conv is None
    before, after = _flat(source, "encoder."), _flat(trained, "encoder.")
    assert before.keys() == after.keys() and len(before) > 10
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # The decoder started from FLUX's (where shapes fit) and trained.
    assert not np.array_equal(_flat(trained, "decoder.conv_out")["decoder.conv_out.kernel"],
                              _flat(source, "decoder.conv_out")["decoder.conv_out.kernel"])

    out = save_pretrained(trained, tmp_path / "export", format="diffusers")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["shift_factor"] == 0.1159
    asym, info = diffusers.AsymmetricAutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 8:24, 4:20] = 1
    t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        mean = asym.eval().encode(t(x)).latent_dist.mean
        np.testing.assert_array_equal(mean.numpy(), flux.encode(t(x)).latent_dist.mean.numpy())
        guided = asym.decode(mean, image=t(x), mask=t(mask)).sample.numpy().transpose(0, 2, 3, 1)
    z = jnp.asarray(mean.numpy().transpose(0, 2, 3, 1))
    ours = np.asarray(trained.decode(z, jnp.asarray(x), jnp.asarray(mask)))
    print(f"exported guided decode vs ours: max abs err {np.abs(guided - ours).max():.1e}")
    np.testing.assert_allclose(guided, ours, atol=ATOL, rtol=RTOL)


def test_encoder_overrides_that_disagree_with_init_from_are_refused(assets, tmp_path):
    from asymvq_jax.train.state import model_config
    c = config(assets)
    vae = checkpoint_free_model(c.model.overrides)
    c.init_from = save_pretrained(vae, str(tmp_path / "src"), format="asymvq")
    assert model_config(c).family == "sd3"  # the encoder, latents and factors are init_from's
    assert model_config(c).asymmetric  # the decoder is the preset's
    c.model.overrides = {**c.model.overrides, "latent_channels": 8}
    with pytest.raises(ValueError, match=r"latent_channels=8 \(init_from has 16\)"):
        model_config(c)


def checkpoint_free_model(overrides):
    from tests.test_inference import random_model
    from asymvq_jax.models import preset
    return random_model(preset("sd", **{**overrides, **FAMILIES["sd3"]}))


@pytest.mark.slow
def test_full_autoencoder_run_measures_its_factors(assets, tmp_path):
    c = config(assets, train_encoder=True, measure_shift=True, total_steps=2, factor_batches=2, eval_every=0,
               **{"model.preset": "sd"})
    workdir = str(tmp_path / "ae")
    train(c, workdir)
    vae = checkpoint.load(workdir)
    cfg = vae.config
    assert cfg.scaling_factor != FAMILIES["sd"]["scaling_factor"] and cfg.shift_factor is not None
    # The batches it measured on: those after the last step.
    z = np.concatenate([np.asarray(vae.encode(jnp.asarray(
        batch_for_step(c, c.total_steps + i, process_index=0, process_count=1)["image"])).mode()) for i in range(2)])
    scaled = np.asarray(cfg.scale(z), np.float64)
    print(f"measured scaling_factor {cfg.scaling_factor:.4f} shift_factor {cfg.shift_factor:.4f}: "
          f"scaled latents std {scaled.std():.6f} mean {scaled.mean():.2e}")
    assert scaled.std() == pytest.approx(1.0, abs=1e-4) and abs(scaled.mean()) < 1e-4
    exported = from_pretrained(save_pretrained(vae, tmp_path / "export", format="diffusers"))
    assert exported.config.scaling_factor == cfg.scaling_factor and exported.config.shift_factor == cfg.shift_factor
