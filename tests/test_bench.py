"""bench.py --quick runs end to end (not timed here: speed goals live in the benchmark) and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the asym-base preset, ours and diffusers'
def test_bench_quick_writes_json(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    # --quick, shrunk to 64 px and one round so that it fits the test budget.
    args = ["--quick", "--sizes", "64", "--models", "asym-base", "--reps", "1", "--json", str(out)]
    run = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["op"]: r for r in result["rows"]}
    assert set(rows) == {"encode", "guided"}
    for r in rows.values():
        assert r["ours_images_per_s"] > 0 and r["diffusers_images_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["diffusers_latency_s"] / r["ours_latency_s"])
        assert r["ours_peak_mib"] > 0
    # FLOPs from XLA's cost analysis, against SPEC's model count (encoder 271 GFLOPs at 256 px, so
    # /16 at 64 px; the guided decode runs its upsampling convs in 4/9 of the multiplies, hence lower).
    assert rows["encode"]["gflops"] == pytest.approx(271 / 16, rel=0.1)
    assert 0.75 * 771 / 16 < rows["guided"]["gflops"] < 771 / 16
    # MFU is FLOPs over latency over the peak the run records (on CPU a measured matmul's rate).
    peak = result["peak_flops"]["float32"]
    assert peak > 1e9
    if result["device"].startswith("cpu"):
        assert "measured" in result["peak_assumed"]["float32"]
    for r in rows.values():
        assert r["mfu"] == pytest.approx(r["gflops"] * 1e9 / r["ours_latency_s"] / peak)
    assert "guided" in run.stdout and "speedup" in run.stdout


def test_conv_profile_finds_every_convolution_of_the_decode():
    """The per-convolution profile accounts for the decode's FLOPs (convolutions are nearly all of
    them), and each convolution it times gives XLA's and torch's kernels the same work."""
    pytest.importorskip("torch")
    import importlib.util

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from asymvq_jax.models import AutoencoderKL, preset
    spec = importlib.util.spec_from_file_location("conv_profile", os.path.join(ROOT, "scripts", "conv_profile.py"))
    conv_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv_profile)

    convs = conv_profile.decode_convs("asym-base", 64, "guided")
    conv_gflop = sum(n * conv_profile.conv_gflop(*key) for key, n in convs.items())
    # FLOPs need shapes only: the model is abstract, never initialised.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(preset("asym-base"), rngs=nnx.Rngs(0))))
    z, image, mask = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, 8, 8, 4), (1, 64, 64, 3), (1, 64, 64, 1)))
    decode = jax.jit(lambda state, z, image, mask: nnx.merge(graphdef, state).decode(z, image, mask))
    compiled = decode.lower(state, z, image, mask).compile()
    cost = compiled.cost_analysis()
    total_gflop = (cost[0] if isinstance(cost, list) else cost)["flops"] / 1e9
    # XLA leaves the taps that fall on padding out of its count (about 5% here), so not <= total.
    assert conv_gflop == pytest.approx(total_gflop, rel=0.1), (conv_gflop, total_gflop)

    strided = next(key for key in convs if key[2] == (2, 2))  # a branch conv: stride 2, padding 1
    xla_s, torch_s = conv_profile.time_conv(*strided, reps=1)  # asserts both outputs agree
    assert xla_s > 0 and torch_s > 0


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_authors_torch_step_computes_what_ours_does(assets):
    """The PyTorch step the benchmark races ours against does the same arithmetic on the same weights
    and batch: on step 1 (GAN on) every logged term and the decoder's gradient agree with ours. The lr
    is tiny so that its second forward (after the decoder's update) sees the decoder ours' one forward
    saw; the posterior noise is ours."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("lpips")
    pytest.importorskip("taming")
    import jax
    import numpy as np

    from asymvq_jax.convert import flax_params_to_diffusers
    from asymvq_jax.train.loop import compiler_options
    from asymvq_jax.train.state import build
    from asymvq_jax.train.step import make_decoder_grads, make_train_step
    from tests.tiny_config import get_config
    bench = load_bench()
    config = get_config()
    config.loss.disc_start, config.loss.lpips_weights, config.ema_decay = 0, assets["lpips"], 0.0
    config.lr = config.end_lr = 1e-9
    graphdefs, state, fixed, tx, disc_tx = build(config)
    x, mask, _ = bench.inputs(config.batch_size, config.image_size)
    batch = {"image": x, "mask": mask}
    fast = compiler_options(config)
    grads, _, _ = jax.jit(make_decoder_grads(config, graphdefs), compiler_options=fast)(state, fixed, batch)
    _, ours = jax.jit(make_train_step(config, graphdefs, tx, disc_tx), compiler_options=fast)(state, fixed, batch)

    vae, perceptual, disc = bench.torch_models(config, graphdefs, state, fixed)
    step = bench.authors_train_step(config, vae, perceptual, disc)
    latent = (config.batch_size, config.image_size // 8, config.image_size // 8, vae.config.latent_channels)
    eps = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), 0), latent))
    tx, tmask, teps = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, mask, eps))
    theirs = step(tx, tmask, 0, teps)

    assert float(ours["disc_factor"]) == 1.0 and float(ours["g_loss"]) != 0.0  # the GAN is on
    for name, value in theirs.items():  # measured: within 2e-5 relative (the adaptive weight)
        np.testing.assert_allclose(float(ours[name]), float(value), rtol=1e-4, atol=1e-6, err_msg=name)
    flat = {tuple(getattr(k, "key", k) for k in path): np.asarray(g)
            for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    want = flax_params_to_diffusers(flat)
    got = {f"decoder.{k}": p.grad.numpy() for k, p in vae.decoder.named_parameters()}
    assert set(got) == set(want)
    # Measured: each array within 2.4e-4 of its largest element (fp32 sums of a 1,752-sized NLL). The
    # attention key bias is left out: its gradient is 0 in exact arithmetic (softmax ignores a shift)
    # and both sides hold rounding noise there.
    for key, g in got.items():
        if not key.endswith("to_k.bias"):
            np.testing.assert_allclose(g, want[key], rtol=0, atol=1e-3 * np.abs(want[key]).max(), err_msg=key)


def test_step_profile_finds_every_convolution_of_the_step(assets):
    """The step profile reads every gradient convolution of the step from its jaxpr (the adaptive weight's
    conv_out VJPs among them), and XLA and torch compute the same gradient for a one-sided padded
    upsampling convolution."""
    pytest.importorskip("torch")
    import importlib.util

    import jax

    from asymvq_jax.losses.lpips import VGG16_CONV_CHANNELS
    from asymvq_jax.train.state import build
    from tests.tiny_config import get_config
    spec = importlib.util.spec_from_file_location("step_profile", os.path.join(ROOT, "scripts", "step_profile.py"))
    step_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_profile)
    config = get_config()
    config.loss.disc_start, config.loss.lpips_weights, config.ema_decay = 0, assets["lpips"], 0.0
    graphdefs, state, fixed, tx, disc_tx = build(config)
    x, mask, _ = load_bench().inputs(config.batch_size, config.image_size)
    batch = {"image": x, "mask": mask}

    counts = step_profile.step_convs(config, graphdefs, state, fixed, tx, disc_tx, batch)
    # One weight-gradient per decoder convolution (four per upsampling one: it runs as four 2x2 sub-pixel
    # convolutions), two more at conv_out (the adaptive weight's VJPs), and two per discriminator
    # convolution (its real and fake calls).
    def kernels(tree):
        return [jax.tree_util.keystr(path) for path, k in jax.tree_util.tree_flatten_with_path(tree)[0]
                if getattr(path[-1], "key", None) == "kernel" and k.ndim == 4]
    decoder = kernels(state["params"]["decoder"])
    upsampling = [path for path in decoder if "upsamplers" in path]
    weight_grads = sum(n for key, n in counts.items() if key[0] == "weight-grad")
    assert upsampling and weight_grads == len(decoder) + 3 * len(upsampling) + 2 + 2 * len(kernels(state["disc"]["params"]))
    kernel = state["params"]["decoder"]["conv_out"]["kernel"].shape
    assert sum(n for key, n in counts.items() if key[0] == "weight-grad" and key[2] == kernel) == 3
    # LPIPS's input-gradients run over the reconstructions only, not over the real images too.
    lpips_kernels = {(3, 3, cin, cout) for cin, cout in VGG16_CONV_CHANNELS}
    lpips_grads = {key: n for key, n in counts.items() if key[0] == "input-grad" and key[2] in lpips_kernels}
    assert sum(lpips_grads.values()) == 13 and {key[1][0] for key in lpips_grads} == {config.batch_size}
    one_sided = next(key for key in counts if key[0] == "weight-grad" and key[4][0][0] != key[4][0][1])
    xla_s, torch_s, ours_s = step_profile.time_kind(*one_sided, reps=1)  # asserts the three outputs agree
    assert xla_s > 0 and torch_s > 0 and ours_s > 0
