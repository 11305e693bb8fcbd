"""bench.py --quick runs end to end (not timed here: speed goals live in the benchmark) and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
