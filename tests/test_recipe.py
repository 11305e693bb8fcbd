"""The recipe against the authors' code: schedules, horizon, lr = base_lr x batch, refused configs, init."""

import importlib.util
import logging
import math
import os

import numpy as np
import pytest

from asymvq_jax.train.config import derived
from asymvq_jax.train.state import decoder_schedules, disc_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (0, 2500, 5000, 50001, 50002, 55001, 120030)


def get_config(name, arg="/path/to/sd-vae"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def authors_lambda(n, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps, start_step=None):
    """The multiplier of the authors' ldm/lr_scheduler.py, restated: LambdaWarmUpCosineScheduler, or with
    `start_step` LambdaWarmUpCosineScheduler_D (0 until start_step, then the same from there)."""
    if start_step is not None:
        if n - start_step <= 0:
            return 0.0
        n, max_decay_steps = n - start_step, max_decay_steps - start_step
    if n < warm_up_steps:
        return (lr_max - lr_start) / warm_up_steps * n + lr_start
    t = min((n - warm_up_steps) / (max_decay_steps - warm_up_steps), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))


def authors_lrs(n, gpus, per_gpu_batch, pretrained_mult, disc_start=50001, epochs=12):
    """Their configure_optimizers: lr = 4.5e-6 x 8 GPUs x batch; the groups' LambdaLR multipliers with
    lr_min = 1e-6 / (group lr), max_decay_steps = epochs x int(1,152,196 / global batch)."""
    lr = 4.5e-6 * gpus * per_gpu_batch
    total = int(epochs * int(1152196 / (gpus * per_gpu_batch)))
    sched = dict(warm_up_steps=5000, lr_max=1.0, lr_start=0.01, max_decay_steps=total)
    return {"pretrained": pretrained_mult * lr * authors_lambda(n, lr_min=1e-6 / (pretrained_mult * lr), **sched),
            "new": lr * authors_lambda(n, lr_min=1e-6 / lr, **sched),
            "disc": lr * authors_lambda(n, lr_min=1e-6 / lr, start_step=disc_start, **sched)}, total


@pytest.mark.parametrize("name, per_gpu, mult", [("asym_base", 10, 0.1), ("asym_x1_5", 4, 1.0), ("asym_x2", 2, 1.0)])
def test_schedules_equal_the_authors_at_every_milestone(name, per_gpu, mult):
    c = get_config(name)
    d = derived(c)
    _, horizon = authors_lrs(0, 8, per_gpu, mult)
    assert d.total_steps == horizon and d.lr == pytest.approx(4.5e-6 * 8 * per_gpu, rel=1e-12)
    ours, disc = decoder_schedules(d), disc_schedule(d)
    # The discriminator optimizer's count starts at disc_start: before it no update happens at all.
    table = []
    for n in (*STEPS, horizon):
        want, _ = authors_lrs(n, 8, per_gpu, mult)
        got = {"pretrained": float(ours["pretrained"](n)) if mult != 1.0 else float(ours["new"](n)),
               "new": float(ours["new"](n)),
               "disc": float(disc(n - d.loss.disc_start)) if n >= d.loss.disc_start else 0.0}
        table.append((n, want, got))
        for group in want:
            assert got[group] == pytest.approx(want[group], rel=1e-6, abs=0), (name, n, group, got, want)
    # The two reference points: the discriminator just after the GAN starts, the end at 1e-6.
    assert table[4][1]["disc"] == pytest.approx(4.5e-6 * 8 * per_gpu * (0.01 + 0.99 / 5000), rel=1e-9)
    assert all(v == pytest.approx(1e-6, rel=1e-6) for v in table[-1][2].values())


def test_x1_5_at_the_released_step_is_far_from_the_end():
    d = derived(get_config("asym_x1_5"))
    assert d.total_steps == 432_072
    assert float(decoder_schedules(d)["new"](120_030)) == pytest.approx(1.20e-4, rel=5e-3)


def test_lr_follows_a_batch_override(caplog):
    c = get_config("asym_base")
    c.batch_size = 32   # what --config.batch_size=32 does: it is set after get_config
    with pytest.raises(ValueError, match=r"gan_group_size=10 does not divide batch_size=32.*--config.loss.gan_group_size"):
        derived(c)      # base's groups of 10 (one of the authors' GPUs) do not fit 32 images
    c.loss.gan_group_size = 8
    with caplog.at_level(logging.INFO):
        d = derived(c)
    assert d.lr == pytest.approx(1.44e-4, rel=1e-12)
    assert "lr 1.44e-4 = 4.5e-6 x 32" in caplog.text
    assert d.total_steps == 12 * (1_152_196 // 32)


def test_horizon_counts_a_folders_images(tmp_path):
    from tests.conftest import sample_photos_dir
    c = get_config("asym_base")
    c.data.source, c.data.path, c.data.num_images, c.batch_size, c.epochs = "folder", sample_photos_dir(tmp_path), 0, 2, 3
    c.loss.gan_group_size = 0
    images = len([f for f in os.listdir(c.data.path)])
    assert derived(c).total_steps == 3 * (images // 2)


def test_an_explicit_lr_and_horizon_stay():
    c = get_config("asym_base")
    c.lr, c.total_steps, c.warmup_steps = 1e-3, 77, 7
    d = derived(c)
    assert (d.lr, d.total_steps) == (1e-3, 77)
    assert float(decoder_schedules(d)["new"](7)) == pytest.approx(1e-3) and float(decoder_schedules(d)["new"](77)) == pytest.approx(1e-6)


def test_a_decoder_only_run_without_init_from_is_refused_before_anything_is_built(tmp_path):
    from asymvq_jax.train.loop import train
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"needs init_from.*--config.init_from="):
        train(get_config("asym_x1_5", arg=None), str(workdir))
    assert not workdir.exists()
    c = get_config("asym_x1_5", arg=None)
    c.random_encoder = True   # on purpose: allowed
    derived(c)
    c = get_config("asym_x1_5", arg=None)
    c.train_encoder = True    # LDM's first stage makes its own encoder
    derived(c)


def test_new_layers_start_from_torchs_default_init():
    """U(+-1/sqrt(fan_in)) for weights and biases: variance 1/(3 fan_in), bounded by 1/sqrt(fan_in)."""
    from flax import nnx

    from asymvq_jax.models.blocks import LayerFactory
    conv = LayerFactory().conv(512, 512, 3, nnx.Rngs(0))   # the widest 3x3 of the SD decoder: 2.4M weights
    fan_in = 512 * 9
    bound, var = fan_in ** -0.5, 1.0 / (3 * fan_in)
    w, b = np.asarray(conv.kernel[...], np.float64), np.asarray(conv.bias[...], np.float64)
    # The variance of 2.4M uniform draws has a relative standard error of sqrt(0.8 / n) = 0.06%;
    # lecun-normal (flax's default) has 3x this variance.
    assert np.var(w) == pytest.approx(var, rel=0.005) and abs(np.mean(w)) < 5 * np.sqrt(var / w.size)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
    assert np.var(b) == pytest.approx(var, rel=0.2) and np.abs(b).max() <= bound
    lin = LayerFactory().linear(512, 512, nnx.Rngs(1))
    assert np.var(np.asarray(lin.kernel[...], np.float64)) == pytest.approx(1 / (3 * 512), rel=0.01)


def test_lecun_fresh_init_is_flaxs_default_and_a_bad_name_is_refused():
    """fresh_init="lecun": lecun-normal weights (variance 1/fan_in, 3x torch's) and zero biases."""
    from flax import nnx

    from asymvq_jax.models.blocks import LayerFactory
    conv = LayerFactory(init="lecun").conv(512, 512, 3, nnx.Rngs(0))
    w = np.asarray(conv.kernel[...], np.float64)
    assert np.var(w) == pytest.approx(1.0 / (512 * 9), rel=0.01)
    assert not np.asarray(conv.bias[...]).any()
    c = get_config("asym_base")
    c.fresh_init = "kaiming"
    with pytest.raises(ValueError, match="fresh_init='kaiming': expected one of torch, lecun"):
        derived(c)
