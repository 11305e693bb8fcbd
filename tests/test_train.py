"""Training end to end on a tiny decoder: learning, frozen encoder, GAN schedule, resume, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymvq_jax import checkpoint
from asymvq_jax.data import batch_for_step
from asymvq_jax.train.loop import NonFiniteLossError, train
from asymvq_jax.train.state import build
from tests import tiny_config
from tests.conftest import logged, random_lpips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def config(assets, **changes):
    c = tiny_config.get_config()
    c.data.path, c.loss.lpips_weights = assets["photos"], assets["lpips"]
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train(config(assets), workdir)
    return workdir


@pytest.mark.slow  # trains, or compiles a train step
def test_reconstruction_error_falls(assets, uninterrupted):
    """Per-step losses swing with the batch; a fixed batch of 8 shows the trend."""
    c = config(assets, batch_size=8)
    batch = batch_for_step(c, 100, process_index=0, process_count=1)
    x, mask = jnp.asarray(batch["image"]), jnp.asarray(batch["mask"])

    def l1(step):
        vae = checkpoint.load(uninterrupted, step=step)
        z = vae.encode(x).mode()
        return float(jnp.abs(vae.decode(z, x, mask) - x).mean()), float(jnp.abs(vae.decode(z) - x).mean())

    (guided_1, plain_1), (guided_6, plain_6) = l1(1), l1(6)
    assert guided_6 < 0.9 * guided_1 and plain_6 < 0.9 * plain_1, (guided_1, guided_6, plain_1, plain_6)


@pytest.mark.slow  # trains, or compiles a train step
def test_gan_switches_on_at_disc_start(uninterrupted):
    m = logged(uninterrupted)
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    # Logged step s is the update made at global step s - 1 (0-based, as Lightning counts):
    # with disc_start=4 the GAN terms are off for logged steps 1-4 and on from 5.
    for step in (1, 2, 3, 4):
        assert m[step]["disc_factor"] == 0 and m[step]["d_loss"] == 0 and m[step]["d_weight"] == 0
    for step in (5, 6):
        assert m[step]["disc_factor"] == 1 and m[step]["d_loss"] > 0 and m[step]["d_weight"] > 0


@pytest.mark.slow  # trains, or compiles a train step
def test_encoder_is_bit_identical_after_training(assets, uninterrupted):
    _, _, fixed, _, _ = build(config(assets))
    trained = checkpoint.load(uninterrupted, step=6)
    fresh = checkpoint.flatten(fixed["frozen"])
    saved = checkpoint.flatten(jax.tree.map(np.asarray, {
        "encoder": _pure(trained.encoder), "quant_conv": _pure(trained.quant_conv),
        "post_quant_conv": _pure(trained.post_quant_conv)}))
    assert fresh.keys() == saved.keys() and len(fresh) > 10
    for k in fresh:
        np.testing.assert_array_equal(saved[k], fresh[k], err_msg=k)


def _pure(module):
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.mark.slow  # trains, or compiles a train step
def test_samples_and_event_files_are_written(uninterrupted):
    assert os.path.exists(os.path.join(uninterrupted, "samples", "step_0000003.png"))
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(uninterrupted, "tensorboard")))
    record = logged(uninterrupted)[3]
    assert np.isfinite(record["samples/known_mse_plain"]) and np.isfinite(record["samples/known_mse_guided"])


@pytest.mark.slow  # trains, or compiles a train step
def test_sigterm_saves_and_resume_repeats_the_uninterrupted_losses(assets, uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={TINY}", f"--workdir={workdir}",
           "--config.total_steps=10000", f"--config.data.path={assets['photos']}",
           f"--config.loss.lpips_weights={assets['lpips']}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the training subprocess made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint.manager(workdir).latest_step()
    assert 2 <= stopped < 6, f"stopped at {stopped}"

    train(config(assets), workdir)  # resumes at `stopped`, runs to step 6
    want, got = logged(uninterrupted), logged(workdir)
    for step in range(stopped + 1, 7):
        for term in ("loss", "nll", "d_loss", "known_mse"):
            assert got[step][term] == want[step][term], (step, term, got[step][term], want[step][term])


@pytest.mark.slow  # trains, or compiles a train step
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, uninterrupted, tmp_path):
    from safetensors.numpy import save_file
    workdir = str(tmp_path / "nan")
    train(config(assets, total_steps=2), workdir)
    # NaN LPIPS weights make the perceptual term NaN. They are an input of the step (a NaN weight in the
    # config would be a constant in it), so this run reuses the step the others compiled.
    nan = {k: np.full_like(v, np.nan) for k, v in random_lpips().items()}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*nll.* at step 3"):
        train(config(assets, **{"loss.lpips_weights": str(tmp_path / "nan.safetensors")}), workdir)
    assert checkpoint.manager(workdir).latest_step() == 2
    checkpoint.load(workdir)  # still restorable


def test_bad_input_fails_at_start_up_and_leaves_no_workdir(assets, tmp_path):
    os.makedirs(tmp_path / "broken")
    for i in range(3):
        (tmp_path / "broken" / f"{i}.png").write_bytes(b"not a png")
    for changes, message in (({"data.path": str(tmp_path / "nowhere")}, "nowhere"),
                             ({"data.path": str(tmp_path / "broken")}, r"none of the first 3 images can be read"),
                             ({"data.source": "nosuch"}, "'nosuch'")):
        started = time.perf_counter()
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(config(assets, **changes), str(tmp_path / "w"))
        assert time.perf_counter() - started < 10, changes
        assert not os.path.exists(tmp_path / "w"), changes


def test_second_run_on_a_workdir_is_refused(assets, tmp_path):
    workdir = str(tmp_path / "busy")
    os.makedirs(workdir)
    with checkpoint.lock_workdir(workdir):
        with pytest.raises(checkpoint.WorkdirBusyError, match=f"{workdir} is in use by another training run .pid "
                                                             f"{os.getpid()}"):
            train(config(assets), workdir)
    assert sorted(os.listdir(workdir)) == ["train.lock"]


def _damage(workdir):
    """Step 6: one array file cut short; step 4: its tree metadata deleted."""
    data = os.path.join(workdir, "checkpoints", "6", "default", "ocdbt.process_0", "d")
    largest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    os.truncate(largest, 100)
    os.remove(os.path.join(workdir, "checkpoints", "4", "default", "_METADATA"))


@pytest.mark.slow  # trains, or compiles a train step
def test_damaged_checkpoints_are_skipped_named_and_kept(assets, uninterrupted, tmp_path, caplog):
    import shutil

    import convert_weights
    workdir = str(tmp_path / "damaged")
    shutil.copytree(uninterrupted, workdir)
    _damage(workdir)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/6 cannot be read: OUT_OF_RANGE"):
        checkpoint.load(workdir, step=6)
    caplog.clear()
    assert convert_weights.main(["export", workdir, str(tmp_path / "export"), "--format", "asymvq"]) == 0
    said = caplog.text
    assert "checkpoints/6 cannot be read (OUT_OF_RANGE" in said and "_METADATA" in said and "--step" in said
    assert "using step 2, the newest that can be read" in said
    np.testing.assert_array_equal(checkpoint.load(workdir, step=2).decoder.conv_out.kernel[...],
                                  __import__("asymvq_jax").from_pretrained(str(tmp_path / "export"))
                                  .decoder.conv_out.kernel[...])

    train(config(assets), workdir)  # resumes at step 2, runs to step 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "4", "4.unreadable", "6",
                                                                         "6.unreadable"]
    want, got = logged(uninterrupted), logged(workdir)
    for step in range(3, 7):
        for term in ("loss", "nll", "d_loss", "known_mse"):
            assert got[step][term] == want[step][term], (step, term, got[step][term], want[step][term])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        trained = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert trained == [1, 2, 3, 4, 5, 6]  # the resumed steps once each


@pytest.mark.slow  # trains, or compiles a train step
def test_export_or_import_into_a_workdir_is_refused(uninterrupted, tmp_path, capsys):
    pytest.importorskip("diffusers")
    import convert_weights

    from tests.test_convert import tree_hashes
    other = str(tmp_path / "model")
    assert convert_weights.main(["export", uninterrupted, other, "--format", "asymvq"]) == 0
    before = tree_hashes(os.path.dirname(uninterrupted))
    for argv, message in ((["export", uninterrupted, uninterrupted, "--format", "diffusers", "--force"],
                           "the same place as the source"),
                          (["export", uninterrupted, os.path.dirname(uninterrupted), "--format", "diffusers"],
                           "a folder holding the source"),
                          (["import", other, uninterrupted], "is not an asymvq export"),
                          (["export", other, uninterrupted, "--format", "diffusers"], "is not a diffusers export")):
        assert convert_weights.main(argv) == 2
        assert message in capsys.readouterr().err, argv
    assert tree_hashes(os.path.dirname(uninterrupted)) == before


@pytest.mark.slow  # trains, or compiles a train step
def test_export_of_a_workdir_loads_in_diffusers(uninterrupted, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import convert_weights
    for ema in (True, False):
        out = str(tmp_path / f"ema{ema}")
        assert convert_weights.main(["export", uninterrupted, out, "--format", "diffusers", "--step", "4"]
                                    + ([] if ema else ["--raw"])) == 0
        model, info = diffusers.AsymmetricAutoencoderKL.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    ema, raw = (checkpoint.load(uninterrupted, step=4, ema=e) for e in (True, False))
    conv_ema, conv_raw = ema.decoder.conv_out.kernel[...], raw.decoder.conv_out.kernel[...]
    assert not np.allclose(conv_ema, conv_raw)  # EMA kept separately from the trained weights
    np.testing.assert_array_equal(ema.encoder.conv_in.kernel[...], raw.encoder.conv_in.kernel[...])


@pytest.mark.slow  # trains, or compiles a train step
def test_init_from_sd_loads_the_decoder_and_scales_its_learning_rate(assets, tmp_path):
    """The base recipe: decoder from an SD VAE at 0.1x lr, the new branch at 1x."""
    from flax import nnx

    from asymvq_jax import save_pretrained
    from asymvq_jax.models import AutoencoderKL
    from asymvq_jax.train.state import model_config

    c = config(assets)
    sd = AutoencoderKL(model_config(c).replace(asymmetric=False), rngs=nnx.Rngs(42))
    c.init_from = save_pretrained(sd, str(tmp_path / "sd"), format="diffusers")
    _, state, fixed, tx, _ = build(c)
    params = state["params"]
    np.testing.assert_array_equal(fixed["frozen"]["encoder"]["conv_in"]["kernel"], sd.encoder.conv_in.kernel[...])
    np.testing.assert_array_equal(params["decoder"]["up_blocks"][1]["resnets"][0]["conv1"]["kernel"],
                                  sd.decoder.up_blocks[1].resnets[0].conv1.kernel[...])

    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    step_of = lambda tree: float(jnp.abs(tree["kernel"]).max())  # noqa: E731
    ratio = step_of(updates["decoder"]["conv_out"]) / step_of(updates["decoder"]["condition_encoder"]["layers"][0])
    assert ratio == pytest.approx(c.pretrained_lr_mult, rel=1e-4)


def test_resume_with_another_train_state_says_what_changed(assets, uninterrupted, tmp_path):
    import shutil
    run = json.load(open(os.path.join(uninterrupted, "run_config.json")))
    assert run["lr"] == 1e-3 and run["batch_size"] == 2 and run["init_from"] is None and not run["train_encoder"]
    assert run["family"] == "asymmetric" and run["mesh"].startswith("data=") and run["model"]["norm_num_groups"] == 4
    workdir = str(tmp_path / "resumed")
    shutil.copytree(uninterrupted, workdir)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"train_encoder was False and is now True\): resume with the settings of "
                                         r".*run_config.json, or start this run in a new --workdir"):
        train(config(assets, train_encoder=True), workdir)
    assert time.perf_counter() - started < 10


def _cli_error(*args) -> tuple[str, float]:
    """train.py's stderr and the CPU seconds it took (wall time depends on the machine's load)."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode != 0
    return r.stderr, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def test_config_mistakes_are_one_line_before_anything_is_built(tmp_path):
    err, cpu = _cli_error("--config=configs/tpu_v4.py", f"--workdir={tmp_path / 'w'}")
    assert err.strip().splitlines() == ["error: configs/tpu_v4.py: no bucket set; give yours: "
                                        "--config configs/tpu_v4.py:bucket=NAME (or :runlocal to try it on this "
                                        "machine)"] and cpu < 10, (err, cpu)
    err, cpu = _cli_error("--config=configs/local.py", f"--workdir={tmp_path / 'w'}", "--config.loss.disc_factor=1")
    assert err.strip().splitlines() == [
        "error: loss is not a field: configs/local.py runs stages ['autoencoder', 'asymmetric'], each with its own "
        "fields: give --config.autoencoder.loss.disc_factor or --config.asymmetric.loss.disc_factor"] and cpu < 10
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow  # trains, or compiles a train step
def test_discriminator_waits_untouched_until_disc_start(assets, uninterrupted):
    """Before disc_start the authors' discriminator lr is 0: its parameters, statistics and Adam state
    (count included) are bit-identical; from disc_start its optimizer counts steps from 0. The config is
    `uninterrupted`'s, so its step is the one that run compiled (the compilation cache has it)."""
    from asymvq_jax import parallel
    from asymvq_jax.train.loop import jit_step

    c = config(assets)
    start = c.loss.disc_start
    mesh = parallel.make_mesh(c.mesh)
    graphdefs, state, fixed, tx, disc_tx = build(c, mesh)
    step = jit_step(c, mesh, graphdefs, tx, disc_tx, state, fixed)
    before = jax.device_get({"disc": state["disc"], "disc_opt": state["disc_opt"]})
    seen = []
    for n in range(start + 2):
        state, _ = step(state, fixed, parallel.global_batch(batch_for_step(c, n, process_index=0, process_count=1),
                                                             mesh))
        seen.append(jax.device_get({"disc": state["disc"], "disc_opt": state["disc_opt"]}))
    for n in range(start):
        jax.tree.map(np.testing.assert_array_equal, seen[n], before)
    counts = [int(jax.tree.leaves(s["disc_opt"])[0]) for s in seen]
    assert counts == [0] * start + [1, 2]
    # The first update (count 0) has lr 0: the parameters stay, the Adam moments move.
    jax.tree.map(np.testing.assert_array_equal, seen[start]["disc"]["params"], before["disc"]["params"])
    assert not np.array_equal(jax.tree.leaves(seen[start]["disc_opt"])[1], jax.tree.leaves(before["disc_opt"])[1])
    # From count 1 the kernels move (a bias may not: the hinge's gradient cancels exactly while every
    # logit is inside (-1, 1)).
    for conv, was in zip(seen[start + 1]["disc"]["params"]["convs"].values(),
                         before["disc"]["params"]["convs"].values()):
        assert not np.array_equal(conv["kernel"], was["kernel"])


def test_init_decoder_false_takes_only_the_frozen_parts_and_trains_all_at_1x(assets, tmp_path):
    """The x1.5 / x2 recipe: the encoder from SD, nothing into the decoder, even where shapes match."""
    from flax import nnx

    from asymvq_jax import save_pretrained
    from asymvq_jax.models import AutoencoderKL
    from asymvq_jax.train.state import model_config

    c = config(assets, init_decoder=False)
    sd = AutoencoderKL(model_config(c).replace(asymmetric=False), rngs=nnx.Rngs(42))
    c.init_from = save_pretrained(sd, str(tmp_path / "sd"), format="diffusers")
    _, state, fixed, tx, _ = build(c)
    np.testing.assert_array_equal(fixed["frozen"]["encoder"]["conv_in"]["kernel"], sd.encoder.conv_in.kernel[...])
    for name in ("kernel", "bias"):  # same shape as SD's, and still fresh
        assert not np.array_equal(state["params"]["decoder"]["conv_out"][name], getattr(sd.decoder.conv_out, name)[...])
    params = state["params"]
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    step_of = lambda tree: float(jnp.abs(tree["kernel"]).max())  # noqa: E731
    assert step_of(updates["decoder"]["conv_out"]) == step_of(updates["decoder"]["condition_encoder"]["layers"][0])


@pytest.mark.slow
def test_export_of_a_run_of_stages_is_its_last_stage(assets, tmp_path):
    import ml_collections

    import convert_weights
    from asymvq_jax import from_pretrained
    from asymvq_jax.train import stages

    first = config(assets, total_steps=2, sample_every=2)
    # The second stage takes the first's encoder and a fresh decoder, and differs by its masks (all
    # holes): its train step is the first's, compiled once.
    second = config(assets, total_steps=2, sample_every=2, init_from="first", init_decoder=False,
                    **{"data.all_ones_prob": 1.0})
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    stages.run(ml_collections.ConfigDict({"stages": ("first", "second"), "first": first, "second": second}), run)
    assert convert_weights.main(["export", run, out, "--format", "diffusers"]) == 0
    exported = checkpoint.flatten(_pure(from_pretrained(out).decoder))
    for stage, same in (("second", True), ("first", False)):
        want = checkpoint.flatten(_pure(checkpoint.load(os.path.join(run, stage)).decoder))
        assert want.keys() == exported.keys()
        assert all(np.array_equal(exported[k], want[k]) for k in want) == same, stage
