"""The FID Inception network: pytorch-fid's `InceptionV3` (TensorFlow's 2015 Inception) in Flax NNX.

Only the path to the 2048-d pool features that FID uses. Module names follow the torch
state-dict keys, so the published weights map by one rule (`from_torch`). The weights are
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a port of TensorFlow's
`inception-2015-12-05.tgz`, released on pytorch-fid's GitHub page (no package index has it).
A user who has the file builds ours once:

    python -m asymvq_jax.inception from-pth pt_inception-2015-12-05-6726825d.pth [--out PATH]
"""

import argparse
import copy
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from asymvq_jax import paths
from asymvq_jax.losses.lpips_weights import load_torch_state_dict

ENV_VAR = "ASYMVQ_FID_INCEPTION"
BUILD_COMMAND = "python -m asymvq_jax.inception from-pth pt_inception-2015-12-05-6726825d.pth"
FEATURES = 2048
INPUT_SIZE = 299


def default_weights_path() -> str:
    return paths.cached_file(ENV_VAR, "fid_inception.safetensors")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nnx.Module):
    """Conv without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

    def __init__(self, cin, cout, kernel, *, stride=1, padding=0, rngs):
        (ph, pw) = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, stride, padding=0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_same(x):
    """3x3 stride-1 mean over the pixels inside the image (TensorFlow's pool: padding not counted)."""
    window = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")  # noqa: E731
    return window(x) / window(jnp.ones((1, *x.shape[1:3], 1), x.dtype))


class InceptionA(nnx.Module):
    def __init__(self, cin, pool_features, rngs):
        self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):  # Mixed_6a: the grid reduction to 17x17
    def __init__(self, cin, rngs):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin, c7, rngs):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv(c7, c7, row["kernel"], padding=row["padding"], rngs=rngs)
        self.branch7x7_3 = BasicConv(c7, 192, col["kernel"], padding=col["padding"], rngs=rngs)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv(c7, c7, col["kernel"], padding=col["padding"], rngs=rngs)
        self.branch7x7dbl_3 = BasicConv(c7, c7, row["kernel"], padding=row["padding"], rngs=rngs)
        self.branch7x7dbl_4 = BasicConv(c7, c7, col["kernel"], padding=col["padding"], rngs=rngs)
        self.branch7x7dbl_5 = BasicConv(c7, 192, row["kernel"], padding=row["padding"], rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):  # Mixed_7a: the grid reduction to 8x8
    def __init__(self, cin, rngs):
        self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """The last two blocks; the FID network pools with max (not mean) in the very last one."""

    def __init__(self, cin, rngs, *, max_pool_branch=False):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_same(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """`model(x)` with NHWC images in [-1, 1] of any size -> pool features [B, 2048], float32.

    As pytorch-fid: bilinear resize to 299x299 (half-pixel centres, no antialiasing), then the
    network to the final average pool.
    """

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs)
        self.Mixed_6a = InceptionB(288, rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs)
        self.Mixed_7a = InceptionD(768, rngs)
        self.Mixed_7b = InceptionE(1280, rngs)
        self.Mixed_7c = InceptionE(2048, rngs, max_pool_branch=True)

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"the FID Inception expects NHWC RGB images, got shape {x.shape}")
        x = jnp.asarray(x, jnp.float32)
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2)))
        x = max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


# torch key suffix -> (our leaf, how the array changes)
_RULE = {"conv.weight": ("conv.kernel", lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))),
         "bn.weight": ("bn.scale", None), "bn.bias": ("bn.bias", None),
         "bn.running_mean": ("bn.mean", None), "bn.running_var": ("bn.var", None)}


def from_torch(state_dict) -> dict[str, np.ndarray]:
    """pytorch-fid's Inception state dict -> our flat weights. Keys the pool features never use
    (the classifier `fc.*`, BatchNorm's `num_batches_tracked`) are dropped."""
    out = {}
    for key, value in state_dict.items():
        rule = next((r for suffix, r in _RULE.items() if key.endswith("." + suffix)), None)
        if rule is None:
            continue
        name, change = rule
        value = np.asarray(value, np.float32)
        out[key.rsplit(".", 2)[0] + "." + name] = change(value) if change else value
    return out


@functools.cache
def _abstract():
    """The graph and the shapes of the network, built once: tracing its 94 layers takes seconds."""
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(nnx.Rngs(0))))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every array our weight file holds (Flax layouts: conv kernels HWIO)."""
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(_abstract()[1])}


def load(weights: str | os.PathLike | dict | None = None) -> InceptionV3:
    """The network with the weights of our file (default `default_weights_path()`) or a flat dict."""
    if weights is None or isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights or default_weights_path())
        if not paths.isfile(path):
            raise FileNotFoundError(f"FID Inception weight file not found: {path}\nBuild it with:  {BUILD_COMMAND}"
                                    f" --out {path}  (the .pth is pytorch-fid's published file)")
        weights = safetensors.numpy.load(paths.read_bytes(path))
    want = expected_shapes()
    missing = sorted(set(want) - set(weights))
    bad = sorted(f"{k}: {tuple(weights[k].shape)} != {s}" for k, s in want.items()
                 if k in weights and tuple(weights[k].shape) != s)
    if missing or bad:
        raise ValueError(f"FID Inception weights do not fit: missing {missing[:5]} ({len(missing)} in all), "
                         f"wrong shapes {bad[:5]}")
    graphdef, state = _abstract()
    state = copy.deepcopy(state)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(weights[".".join(str(getattr(k, "key", k)) for k in path)], jnp.float32),
        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def build_from_pth(pth: str, out: str) -> str:
    """Our weight file from pytorch-fid's published `.pth` (read with torch, weights only)."""
    weights = from_torch(load_torch_state_dict(pth))
    load(weights)  # every key present with its shape, or a clear error
    with paths.atomic_output(out, is_dir=False) as tmp:
        safetensors.numpy.save_file(weights, tmp,
                                    metadata={"format": "asymvq-fid-inception", "source": paths.path(pth).name})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asymvq_jax.inception", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("from-pth", help="build our weight file from pytorch-fid's .pth")
    build.add_argument("pth")
    build.add_argument("--out", default=default_weights_path())
    args = parser.parse_args(argv)
    print(build_from_pth(args.pth, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
