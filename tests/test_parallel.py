"""The train step on 8 simulated devices: meshes agree with one device, fsdp shards, checkpoints move between meshes.

Device counts are fixed per process, so every run here is a subprocess (tests/multidevice.py).
"""

import json
import os
import shutil

import numpy as np
import pytest

from asymvq_jax import checkpoint
from tests import multidevice
from tests.conftest import logged

pytestmark = pytest.mark.slow
LR = 1e-3  # tiny_config's constant learning rate


def run_multidevice(kind, report, assets, tmp_path_factory):
    """tests/multidevice.py `kind` on 8 simulated devices; its out folder and its JSON `report`."""
    out = str(tmp_path_factory.mktemp(kind))
    log = os.path.join(out, "log.txt")
    proc = multidevice.start(["-m", "tests.multidevice", kind, out, assets["photos"], assets["lpips"]], 8, log)
    multidevice.finish(proc, log)
    with open(os.path.join(out, report)) as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def stepped(assets, tmp_path_factory):
    return run_multidevice("steps", "report.json", assets, tmp_path_factory)


@pytest.fixture(scope="module")
def grouped(assets, tmp_path_factory):
    return run_multidevice("groups", "weights.json", assets, tmp_path_factory)


@pytest.mark.pod
def test_gan_groups_of_2_on_8_devices_equal_1_device_and_the_authors_ddp_arithmetic(grouped):
    """gan_group_size=2: the gradient does not depend on the mesh, and equals the mean of 4 GPUs'
    gradients, each with its own adaptive weight and discriminator statistics (tests/multidevice.py)."""
    out, weights = grouped
    per_gpu = weights["authors_per_gpu"]
    assert len(per_gpu) == 4 and max(per_gpu) > 1.05 * min(per_gpu)  # the groups' weights really differ
    assert weights["1"] == pytest.approx(weights["authors"], rel=1e-4)
    assert weights["8x1"] == pytest.approx(weights["1"], rel=1e-5)
    one, eight, authors = (np.load(os.path.join(out, f"grads_{n}.npz")) for n in ("1", "8x1", "authors"))
    assert one.files == eight.files == authors.files and len(one.files) > 50
    largest = max(float(np.abs(authors[k]).max()) for k in authors.files)
    for key in one.files:
        if key.endswith("to_k.bias"):  # zero in exact arithmetic (softmax ignores it): rounding noise alone
            assert max(np.abs(g[key]).max() for g in (one, eight, authors)) < 1e-6 * largest, key
            continue
        # Within float32 summation order of each array's largest element. The GAN term is scaled by weights
        # near 900, so rounding in its sums shows up large. Largest seen: one device against 8 devices
        # and against the DDP arithmetic 2.5e-4 (a Xeon with AVX-512 IFMA, and an AVX2-only CPU); 8
        # devices against the DDP arithmetic 7e-6. A wrong grouping would be off by the groups' spread of
        # weights (up to 40%), 400 times the bound.
        scale = float(np.abs(authors[key]).max())
        np.testing.assert_allclose(eight[key], one[key], rtol=0, atol=1e-3 * scale, err_msg=key)
        np.testing.assert_allclose(one[key], authors[key], rtol=0, atol=1e-3 * scale, err_msg=key)


@pytest.mark.pod
@pytest.mark.parametrize("mesh", ["8x1", "2x4"])
def test_one_step_on_8_devices_matches_one_device(stepped, mesh):
    out, report = stepped
    want, got = report["1"]["metrics"], report[mesh]["metrics"]
    for term in ("loss", "nll", "l1", "known_mse", "kl"):
        assert got[term] == pytest.approx(want[term], rel=1e-5, abs=1e-7), term
    ref, new = np.load(os.path.join(out, "params_1.npz")), np.load(os.path.join(out, f"params_{mesh}.npz"))
    assert ref.files == new.files and len(ref.files) > 50
    # Adam's first step is +-lr per element whatever the gradient's size, so an element whose
    # gradient is at rounding level (the attention key bias has an exactly zero one) moves by
    # +-lr on the sign of that noise, which depends on the summation order. Every element is
    # within 2 lr; all but a handful within float rounding.
    off, total = 0, 0
    for key in ref.files:
        diff = np.abs(new[key] - ref[key])
        assert diff.max() <= 2 * LR + 1e-6, key
        if not key.endswith("to_k.bias"):
            off += int(np.sum(diff > 1e-5 + 1e-4 * np.abs(ref[key])))
            total += diff.size
    assert off <= 1e-3 * total, (off, total)


@pytest.mark.pod
def test_fsdp_splits_parameters_and_optimizer_state_and_the_batch(stepped):
    mesh = "2x4"
    fsdp = multidevice.MESHES[mesh][1]["fsdp"]
    _, report = stepped
    held = report[mesh]["held"]  # path -> (bytes of the array, bytes on device 0, partition spec)
    sharded = {k: v for k, v in held.items() if "fsdp" in v[2]}
    assert any(k.startswith("params.") for k in sharded) and any(k.startswith("opt.") for k in sharded)
    for key, (whole, on_device, _) in sharded.items():
        assert on_device * fsdp == whole, key
    # Only arrays under fsdp_min_size (biases, norms) stay whole.
    assert sum(v[0] for v in sharded.values()) > 0.9 * sum(v[0] for v in held.values())
    one_device = sum(v[1] for v in report["1"]["held"].values())
    assert sum(v[1] for v in held.values()) < one_device / fsdp * 1.1
    assert report[mesh]["batch_shards"] == [1] * 8  # batch 8 over 8 devices


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
    """The command the README gives, saving every step so the restore test can start from step 1."""
    workdir = str(tmp_path_factory.mktemp("runlocal") / "run")
    log = workdir + ".log"
    proc = multidevice.start(["train.py", "--config", "configs/tpu_v4.py:runlocal", "--workdir", workdir,
                              "--config.checkpoint_every=1"], 8, log)
    return workdir, multidevice.finish(proc, log)


@pytest.mark.pod
def test_runlocal_trains_on_a_sharded_mesh_and_writes_a_checkpoint(runlocal):
    workdir, log = runlocal
    assert "mesh=data=4 x fsdp=2" in log
    assert checkpoint.manager(workdir).latest_step() == 3
    assert sorted(logged(workdir)) == [1, 2, 3]
    checkpoint.load(workdir)


@pytest.mark.pod
def test_checkpoint_from_8_devices_restores_onto_2_whole(runlocal, tmp_path):
    """Step 1 of the run on 8 devices, each parameter split in 2 (fsdp 2), resumes on 2 devices that
    hold every parameter whole (fsdp 1): another device count and another split at once."""
    source, _ = runlocal
    want = logged(source)[2]
    workdir = str(tmp_path / "on2")
    shutil.copytree(source, workdir)
    for step in (2, 3):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    log = workdir + ".log"
    text = multidevice.finish(multidevice.start(
        ["train.py", "--config", "configs/tpu_v4.py:runlocal", "--workdir", workdir, "--config.total_steps=2",
         "--config.mesh.fsdp=1"], 2, log), log)
    assert "resumed" in text and "fsdp=1" in text
    got = logged(workdir)
    assert sorted(got) == [2]
    for term in ("loss", "nll", "known_mse"):
        # bfloat16 compute (runlocal keeps tpu_v4's dtypes): summation order differs between meshes
        assert got[2][term] == pytest.approx(want[term], rel=3e-3), term


def test_mesh_sizes_and_the_sharding_rule():
    from asymvq_jax.parallel import P, mesh_shape, spec
    assert mesh_shape({}, 8) == (8, 1) and mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
    assert mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
    for bad, words in (({"data": -1, "fsdp": -1}, "at most one -1"), ({"fsdp": 3}, "does not divide"),
                       ({"data": 2, "fsdp": 2}, "uses 4 of 8")):
        with pytest.raises(ValueError, match=words):
            mesh_shape(bad, 8)
    # The largest divisible dimension (the later one on ties); small or indivisible arrays replicate.
    assert spec((3, 3, 768, 768), 4, 2**18) == P(None, None, None, "fsdp")
    assert spec((3, 3, 768, 384), 4, 2**18) == P(None, None, "fsdp", None)
    assert spec((768,), 4, 2**18) == P() and spec((3, 3, 3, 3), 2, 1) == P() and spec((512, 512), 1, 1) == P()
