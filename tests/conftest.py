"""What every test shares: one compilation cache for the whole session, and the assets runs read.

Most of the suite's time is XLA compiling small programs, many of them the same program in another
process (xdist workers, train.py and eval.py subprocesses) or in another `jax.jit` of one process.
The cache is set here, before anything imports jax, so every subprocess inherits it.
"""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# For the simulated-device subprocesses, whose programs are tiny: compile them fast rather than well.
# Not for the whole session: at optimization level 0 the local config's train step compiled in over
# 900 s where it takes 357 s by default (wall time, one busy 2-core machine).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def _own_cores() -> None:
    """Gives each xdist worker its own share of the cores, before jax starts (XLA sizes its thread pools
    from them; processes the worker starts inherit them). Unpinned, both workers' XLA thread pools spread
    over both cores of a 2-core machine and spin waiting for each other: test_train and test_stages
    together took 354 s (629 CPU s) unpinned, 305 s (553 CPU s) pinned, on one machine."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and count > 1 and len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])


_own_cores()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA flags for a subprocess with `devices` simulated CPU devices (fixed when a process starts jax)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept] + [FAST_COMPILE] * fast_compile)


def random_lpips() -> dict[str, np.ndarray]:
    """LPIPS weights of the right shapes (the real ones need a download): He-scaled kernels, positive heads."""
    from asymvq_jax.losses.lpips import expected_shapes
    rng = np.random.default_rng(0)
    return {k: (rng.normal(size=s) * np.sqrt(2.0 / np.prod(s[:-1])) if len(s) == 4 else
                np.abs(rng.normal(size=s)) * 0.1).astype(np.float32) for k, s in expected_shapes().items()}


def logged(workdir) -> dict[int, dict]:
    """Everything a run logged, per step (train metrics and sample metrics are separate records)."""
    from asymvq_jax import paths
    merged = {}
    for line in paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record)
    return merged


def sample_photos_dir(dst) -> str:
    """The bundled training photos as PNGs in `dst`: an image folder for `source='folder'`."""
    from PIL import Image

    from asymvq_jax.data import TRAIN_PHOTOS, bundled_photo
    dst = os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    for name in TRAIN_PHOTOS:
        path = os.path.join(dst, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(bundled_photo(name)).save(path)
    return dst


# xdist gives each worker whole files (pyproject: --dist loadfile), in this order: the slowest first, so
# the two workers end together. By default it starts with the files holding the most tests, which left
# the few long runs (stages, pods, families) to the end, on one worker.
SLOWEST_FIRST = ("test_train.py", "test_parallel.py", "test_stages.py", "test_train_families.py",
                 "test_multihost.py", "test_gcs.py", "test_eval.py", "test_inference.py", "test_convert.py",
                 "test_models.py", "test_families.py", "test_gan.py", "test_readme_families.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    """The bundled training photos and a random-weight LPIPS file, written once per session."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("assets")
    save_file(random_lpips(), str(root / "lpips.safetensors"))
    return {"photos": sample_photos_dir(root / "photos"), "lpips": str(root / "lpips.safetensors")}
