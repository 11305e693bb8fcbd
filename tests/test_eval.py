"""eval.py and eval during training, on the bundled photos and a briefly trained tiny decoder."""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

import asymvq_jax
from asymvq_jax import evaluation
from asymvq_jax.data.evalset import MASKS_DIR, draw_mask_set, load_masks
from asymvq_jax.data.masks import example_rng, lama_mask
from asymvq_jax.losses.lpips import LPIPS
from asymvq_jax.train.loop import train
from tests import tiny_config
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, STEPS = 32, 24


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """32x32 masks, a tiny decoder trained for a few steps with eval during training, and a plain
    SD-shaped baseline."""
    root = tmp_path_factory.mktemp("eval")
    os.makedirs(root / "masks")
    for i in range(5):
        m = lama_mask(example_rng(1, i), SIZE, SIZE)[..., 0]
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"{i}.png")

    c = tiny_config.get_config()
    c.data.path, c.loss.lpips_weights = assets["photos"], assets["lpips"]
    c.total_steps, c.eval_every, c.eval.num_images = STEPS, STEPS // 2, 8
    c.sample_every, c.checkpoint_every = STEPS, STEPS
    c.data.all_ones_prob = 0.0  # every step teaches the branch the known region, so 8 steps show its gain
    train(c, str(root / "workdir"))

    sd = asymvq_jax.AutoencoderKL(asymvq_jax.preset("sd", **c.model.overrides), rngs=nnx.Rngs(0))
    asymvq_jax.save_pretrained(sd, str(root / "sd"), format="diffusers")
    return {"root": root, "photos": c.data.path, "masks": str(root / "masks"), "workdir": str(root / "workdir"),
            "sd": str(root / "sd"), "lpips": assets["lpips"]}


def eval_args(run, out, *extra):
    return ["--decoder", run["workdir"], "--decoder", run["sd"], "--data", f"folder:{run['photos']}",
            "--masks", run["masks"], "--image_size", str(SIZE), "--batch_size", "8", "--lpips", run["lpips"],
            "--fid_inception", "", "--grids", "3", "--out", str(out), *extra]


def tensorboard_tags(logdir):
    """{tag: kind} of every summary in the event files (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto.event_pb2 import Event
    tags = {}
    for path in glob.glob(os.path.join(logdir, "events.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                tags[v.tag] = v.WhichOneof("value")
    return tags


@pytest.mark.slow
def test_eval_during_training_is_logged(run):
    records = [json.loads(line) for line in open(os.path.join(run["workdir"], "metrics.jsonl"))]
    evals = {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [STEPS // 2, STEPS]
    last = evals[STEPS]
    for key in ("psnr/whole", "psnr/hole", "psnr/known", "ssim/known", "lpips/whole", "pre_error"):
        assert np.isfinite(last[f"eval/plain/{key}"]) and np.isfinite(last[f"eval/guided/{key}"])
    assert last["eval/guided/pre_error"] < last["eval/plain/pre_error"]
    tags = tensorboard_tags(os.path.join(run["workdir"], "tensorboard"))
    assert tags["samples"] == "image" and tags["eval/guided/pre_error"] == "simple_value"


@pytest.fixture(scope="module")
def single(run):
    """The same evaluation in this process, on its one device."""
    return evaluation.evaluate([evaluation.load_candidate(run["workdir"]), evaluation.load_candidate(run["sd"])],
                             evaluation.dataset_images(run["photos"]), load_masks(run["masks"], SIZE),
                             image_size=SIZE, batch_size=8, lpips=LPIPS(run["lpips"]))


@pytest.mark.slow
def test_eval_py_sharded_over_8_devices_equals_one_device(run, single, tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8, fast_compile=False), "JAX_PLATFORMS": "cpu"}  # compiled as here
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *eval_args(run, tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.load(open(tmp_path / "out" / "results.json"))
    table = open(tmp_path / "out" / "results.md").read()
    assert "| workdir | guided |" in table and "| sd | plain |" in table and "| sd | guided |" not in table
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md", "sd_best.png", "sd_worst.png",
                                                     "workdir_best.png", "workdir_worst.png"]
    cell = SIZE * -(-256 // SIZE)  # grids enlarge small images to at least 256 px, under a label row
    width, height = Image.open(tmp_path / "out" / "workdir_worst.png").size
    assert width == 4 * cell and 3 * cell < height < 4 * cell
    trained = sharded["decoders"]["workdir"]
    assert sharded["num_images"] == len(os.listdir(run["photos"])) and sharded["images_per_s"] > 0
    assert trained["guided"]["pre_error"] < trained["plain"]["pre_error"]   # what the branch is for
    assert trained["guided"]["psnr/known"] > trained["plain"]["psnr/known"]

    assert single["decoders"].keys() == sharded["decoders"].keys()
    for name, modes in single["decoders"].items():
        for mode, row in modes.items():
            assert row.keys() == sharded["decoders"][name][mode].keys()
            for k, v in row.items():
                assert v == pytest.approx(sharded["decoders"][name][mode][k], rel=1e-5, abs=1e-6), (name, mode, k)


@pytest.mark.slow
def test_outside_latents_decode_like_the_encoder(run, single, tmp_path):
    decoder = evaluation.load_candidate(run["workdir"])
    images, masks = evaluation.dataset_images(run["photos"]), load_masks(run["masks"], SIZE)
    vae = nnx.merge(decoder.graphdef, *decoder.states)
    for batch, names in evaluation.eval_batches(images, masks, SIZE, 8):
        z = np.asarray(vae.encode(batch["image"]).mode()) * vae.config.scaling_factor  # as pipelines hand them over
        for j, name in enumerate(names):
            nchw = np.ascontiguousarray(z[j].transpose(2, 0, 1))   # diffusers' layout
            if j % 2:
                np.save(tmp_path / f"{name}.npy", nchw[None])
            else:
                save_file({"latents": nchw}, str(tmp_path / f"{name}.safetensors"))
    got = evaluation.evaluate([decoder], images, masks, image_size=SIZE, batch_size=8, latents=str(tmp_path))
    want = single["decoders"]["workdir"]
    for mode in ("plain", "guided"):
        for k, v in got["decoders"]["workdir"][mode].items():
            assert v == pytest.approx(want[mode][k], rel=1e-4, abs=1e-6), (mode, k)
    os.remove(tmp_path / f"{images[0][0]}.safetensors")
    with pytest.raises(FileNotFoundError, match=f"no latents for image '{images[0][0]}'"):
        evaluation.evaluate([decoder], images, masks, image_size=SIZE, batch_size=8, latents=str(tmp_path))


@pytest.mark.slow
def test_bad_input_is_named(run, tmp_path):
    from eval import main
    with pytest.raises(FileNotFoundError, match="missing_ckpt"):
        main(eval_args(run, tmp_path / "a") + ["--decoder", str(tmp_path / "missing_ckpt")])
    with pytest.raises(ValueError, match=r"mask .*0\.png is 32x32, the images are 64x64"):
        main(eval_args(run, tmp_path / "b") + ["--image_size", "64"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="contains no images"):
        main(eval_args(run, tmp_path / "c") + ["--data", f"folder:{tmp_path / 'empty'}"])
    with pytest.raises(FileNotFoundError, match="nonexistent_set"):
        load_masks("nonexistent_set", 256)


def test_shipped_mask_sets_are_the_seeded_draws():
    names = sorted(os.listdir(MASKS_DIR))
    assert names == ["medium_256", "medium_512", "thick_256", "thick_512", "thin_256", "thin_512"]
    for name in ("thin_256", "thick_512"):
        size = int(name.split("_")[1])
        masks = load_masks(name, size)
        assert masks.shape == (200, size, size, 1)
        area = masks.mean(axis=(1, 2, 3))
        assert area.min() > 0 and area.max() <= 0.5
        np.testing.assert_array_equal(masks[:2, ..., 0], draw_mask_set(name, 2))


def test_out_never_overlaps_an_input_or_replaces_another_folder(tmp_path):
    from eval import main
    workdir, photos, unrelated = tmp_path / "workdir", tmp_path / "photos", tmp_path / "unrelated"
    for d in (workdir, photos, unrelated):
        os.makedirs(d)
        (d / "keep.txt").write_text("mine")
    args = ["--decoder", str(workdir), "--data", f"folder:{photos}"]
    for out, message in ((workdir, "the same place as the source"), (workdir / "eval", "inside the source"),
                         (photos / "eval", "inside the source"), (tmp_path, "a folder holding the source"),
                         (unrelated, "exists and is not an earlier eval's output")):
        with pytest.raises(ValueError, match=message):
            main(args + ["--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["photos", "unrelated", "workdir"]
    assert all(os.listdir(d) == ["keep.txt"] for d in (workdir, photos, unrelated))


def test_default_masks_fit_any_image_size():
    from eval import default_masks
    assert default_masks(256) == "thick_256" and default_masks(512) == "thick_512"
    assert load_masks(default_masks(64), 64, count=3).shape == (3, 64, 64, 1)
