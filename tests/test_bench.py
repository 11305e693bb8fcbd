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
