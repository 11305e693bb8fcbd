"""Two processes on localhost train together (jax.distributed, gloo CPU collectives), as two TPU hosts do.

Each process has 2 simulated devices; the mesh (data 2 x fsdp 2) spans both, so parameters are
split across processes and each process feeds its own half of every batch.
"""

import json
import os
import signal
import time

import pytest

from asymvq_jax import checkpoint
from asymvq_jax.data import batch_for_step
from tests import multidevice
from tests.conftest import logged

pytestmark = [pytest.mark.slow, pytest.mark.pod]
TINY = os.path.join(multidevice.ROOT, "tests", "tiny_config.py")


# The session's compilation cache, through the config option (it shares programs between processes).
CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]


def flags(assets, workdir, steps):
    # The discriminator starts after the first step, so hosts are compared on both players.
    return [f"--config={TINY}", f"--workdir={workdir}", f"--config.data.path={assets['photos']}",
            f"--config.loss.lpips_weights={assets['lpips']}", "--config.batch_size=8",
            "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=256", f"--config.total_steps={steps}",
            "--config.loss.disc_start=1", f"--config.compilation_cache_dir={CACHE}"]


def start_pair(assets, workdir, steps):
    os.makedirs(workdir, exist_ok=True)
    port = multidevice.free_port()
    procs = []
    for i in range(2):
        args = ["-m", "tests.multidevice", "host", workdir, *flags(assets, workdir, steps),
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=gloo",
                "--config.distributed.heartbeat_timeout_s=1200"]  # compiling on a shared 2-core machine
        log = os.path.join(workdir, f"log_{i}.txt")
        procs.append((multidevice.start(args, 2, log), log))
    return procs


def records(workdir):
    return [json.load(open(os.path.join(workdir, f"process_{i}.json"))) for i in range(2)]


def steps_logged(workdir) -> set[int]:
    """The steps of metrics.jsonl's complete lines (the run is still writing it)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    text = open(metrics).read() if os.path.exists(metrics) else ""
    return {json.loads(line)["step"] for line in text.split("\n")[:-1]}


COMPARED = 3  # steps compared with the one-process run
ENDLESS = 10_000  # the pair's length: it ends only by SIGTERM


@pytest.fixture(scope="module")
def together(assets, tmp_path_factory):
    """Two processes train until a SIGTERM to the second one, sent once step COMPARED is logged;
    alongside, the same run on one process with all four devices, for COMPARED steps. The
    discriminator starts after the first step, so steps 2 and 3 train both players.

    One pair serves the agreement tests and the SIGTERM test. A second pair for the stop alone cost
    over a quarter of this file's CPU time: its second process found nothing in the compilation cache
    (jax writes it from process 0 only, and process 1 never hit those entries) and compiled
    every program again."""
    root = tmp_path_factory.mktemp("multihost")
    pair_dir, single_dir = str(root / "pair"), str(root / "single")
    pair = start_pair(assets, pair_dir, ENDLESS)
    single_log = str(root / "single.log")
    single = multidevice.start(["train.py", *flags(assets, single_dir, COMPARED)], 4, single_log)
    deadline = time.time() + 1200
    while COMPARED not in steps_logged(pair_dir):
        assert all(p.poll() is None for p, _ in pair), [open(log).read()[-3000:] for _, log in pair]
        assert time.time() < deadline, "the training processes made no progress"
        time.sleep(0.2)
    pair[1][0].send_signal(signal.SIGTERM)
    for proc, log in pair:
        multidevice.finish(proc, log, timeout=600)
    multidevice.finish(single, single_log)
    return pair_dir, single_dir


def test_two_processes_agree_with_one(together):
    pair, single = together
    got, want = logged(pair), logged(single)
    assert sorted(want) == [1, 2, 3] and sorted(got)[:3] == [1, 2, 3]
    # Logged step s is the update at global step s - 1: with disc_start=1 the GAN is on from step 2.
    assert got[1]["d_loss"] == 0 and all(got[s]["d_loss"] > 0 and got[s]["disc_factor"] == 1 for s in (2, 3))
    # Step 1 agrees to float rounding. After it, the attention key bias (an exactly zero gradient) has
    # taken a +-lr Adam step on the sign of its rounding noise, which differs with the summation order
    # and moves later losses. Step 2: up to ~1e-4 relative on a CPU with AVX-512, 1.3e-3 (g_loss, the
    # discriminator's mean output) on one with AVX2 only. By step 3 the adaptive weight, a ratio of
    # gradient norms, has amplified it (AVX2 only: d_weight 8.9e-2, g_loss 1.1e-2, loss 2.5e-3 apart),
    # so step 3 compares the terms it does not scale (at most 4.1e-4 apart). Another split of the batch
    # between hosts would move every term by far more.
    all_terms = ("loss", "nll", "d_loss", "g_loss", "d_weight", "known_mse")
    for step, rel, terms in ((1, 1e-6, all_terms), (2, 5e-3, all_terms), (3, 5e-3, ("nll", "d_loss", "known_mse"))):
        for term in terms:
            assert got[step][term] == pytest.approx(want[step][term], rel=rel, abs=1e-7), (step, term)
    assert "2 hosts" in open(os.path.join(pair, "log_0.txt")).read()


def test_each_process_reads_its_own_half_of_the_batch(assets, together):
    import hashlib
    pair, _ = together
    config = multidevice.tiny(assets["photos"], assets["lpips"])
    for i, record in enumerate(records(pair)):
        assert len(record["batches"]) >= COMPARED
        for step, digest in enumerate(record["batches"]):
            mine = batch_for_step(config, step, process_index=i, process_count=2)["image"]
            assert mine.shape[0] == 4 and digest == hashlib.sha1(mine.tobytes()).hexdigest(), (i, step)
    assert records(pair)[0]["batches"][0] != records(pair)[1]["batches"][0]


def test_only_process_0_reports(together):
    pair, _ = together
    first, second = records(pair)
    assert first["grids"] >= 1 and second["grids"] == 0
    logged = [line for line in open(os.path.join(pair, "metrics.jsonl"))]
    assert len(logged) == len(set(logged))  # one writer: no step written twice
    assert len([f for f in os.listdir(os.path.join(pair, "tensorboard")) if f.startswith("events.")]) == 1
    assert "step 1:" not in open(os.path.join(pair, "log_1.txt")).read()


def test_sigterm_to_one_process_stops_both_at_the_same_step(together):
    pair, _ = together
    steps = [len(r["batches"]) for r in records(pair)]
    assert steps[0] == steps[1] and COMPARED <= steps[0] < ENDLESS
    assert checkpoint.manager(pair).latest_step() == steps[0]
    assert max(logged(pair)) == steps[0]
    vae = checkpoint.load(pair)  # complete: restores on one device, one process
    assert vae.decoder.conv_out.kernel[...].shape[-1] == 3
