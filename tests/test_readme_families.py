"""The README's SDXL and FLUX snippets, run with tiny random-weight pipelines built offline: the
pipeline's output_type="latent", then the exported asymmetric decoder in PyTorch, against ours."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from asymvq_jax import save_pretrained
from asymvq_jax.models import FAMILIES, VAEConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from tests.test_convert import _tiny_tokenizer  # noqa: E402
from tests.test_inference import random_model  # noqa: E402

SIZE = 64
WIDTHS = dict(down_block_out_channels=(32, 32, 64, 64), layers_per_down_block=1, norm_num_groups=32)


def _pipeline_vae(name):
    """The pipeline's own VAE: a plain diffusers AutoencoderKL of the family."""
    torch.manual_seed(1)
    fam = FAMILIES[name]
    return diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32,
        latent_channels=fam["latent_channels"], scaling_factor=fam["scaling_factor"],
        shift_factor=fam["shift_factor"], use_quant_conv=fam["use_quant_conv"],
        use_post_quant_conv=fam["use_post_quant_conv"]).eval()


def _asymmetric(name, folder):
    """Our asymmetric decoder of the family (random weights) and its diffusers export."""
    ours = random_model(VAEConfig(**WIDTHS, up_block_out_channels=(32, 64, 64, 64), layers_per_up_block=1,
                                  **FAMILIES[name]), seed=3)
    return ours, save_pretrained(ours, folder, format="diffusers")


def _image_and_mask():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)  # [0, 1], as pipelines take it
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 8:40] = 1
    return image, mask


def _ours(vae, z_unscaled, image, mask):
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    return np.asarray(vae.decode(nhwc(z_unscaled), nhwc(image * 2 - 1), nhwc(mask))).transpose(0, 3, 1, 2)


def _assert_known_region_equal(out, ours, mask):
    known = np.broadcast_to(mask.numpy() == 0, out.shape)
    err = np.abs(out - ours)
    print(f"known region max abs err {err[known].max():.1e}, whole image {err.max():.1e}")
    np.testing.assert_allclose(out[known], ours[known], atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(out, ours, atol=2e-4, rtol=1e-3)


def _clip(cls=None, **kw):
    cfg = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                      intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=60, max_position_embeddings=77, projection_dim=32, **kw)
    return (cls or transformers.CLIPTextModel)(cfg).eval()


@pytest.mark.slow
def test_sdxl_inpaint_latents_decode_like_ours(tmp_path):
    (tmp_path / "tok").mkdir()
    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=32)
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=_pipeline_vae("sdxl"), text_encoder=_clip(), text_encoder_2=_clip(transformers.CLIPTextModelWithProjection),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(), scheduler=diffusers.EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    image, mask = _image_and_mask()
    ours, folder = _asymmetric("sdxl", tmp_path / "asym-sdxl")
    AsymmetricAutoencoderKL = diffusers.AsymmetricAutoencoderKL  # noqa: N806  (the README's name)
    prompt = "a cat"

    # -- the README's SDXL snippet
    latents = pipe(prompt, image=image, mask_image=mask, output_type="latent", height=SIZE, width=SIZE,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    asym = AsymmetricAutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        out = asym.decode(latents / asym.config.scaling_factor, image=image * 2 - 1, mask=mask).sample
    # --

    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    _assert_known_region_equal(out.numpy(), _ours(ours, latents / 0.13025, image, mask), mask)


@pytest.mark.slow
def test_flux_fill_latents_decode_like_ours(tmp_path):
    (tmp_path / "tok").mkdir()
    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    # FLUX Fill's transformer reads the noisy latents (64 packed channels), the masked image's (64)
    # and the mask's (8 x 8 pixels per latent, packed 2 x 2: 256).
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=60, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
    pipe = diffusers.FluxFillPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_pipeline_vae("flux"), text_encoder=_clip(),
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    image, mask = _image_and_mask()
    ours, folder = _asymmetric("flux", tmp_path / "asym-flux")
    AsymmetricAutoencoderKL = diffusers.AsymmetricAutoencoderKL  # noqa: N806
    prompt, h, w = "a cat", SIZE, SIZE

    # -- the README's FLUX snippet
    latents = pipe(prompt, image=image, mask_image=mask, height=h, width=w, output_type="latent",
                   num_inference_steps=2, max_sequence_length=16,
                   generator=torch.Generator().manual_seed(0)).images
    latents = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
    shift = json.load(open(folder + "/config.json"))["shift_factor"]   # the class does not keep it
    asym = AsymmetricAutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        out = asym.decode(latents / asym.config.scaling_factor + shift, image=image * 2 - 1, mask=mask).sample
    # --

    assert latents.shape == (1, 16, SIZE // 8, SIZE // 8)
    _assert_known_region_equal(out.numpy(), _ours(ours, latents / 0.3611 + 0.1159, image, mask), mask)
