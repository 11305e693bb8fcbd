"""The PatchGAN discriminator (taming-transformers / LDM `NLayerDiscriminator`).

For ndf=64, n_layers=3: 4x4 convs with explicit padding 1 (torch's Conv2d(k=4, p=1), never
"SAME"), strides 2, 2, 2, 1, 1, widths 64, 128, 256, 512, 1, LeakyReLU(0.2), BatchNorm on the
three middle convs (which have no bias); 256 px in, 30x30 logits out. Initialised as taming's
weights_init (kernels N(0, 0.02), BatchNorm scale N(1, 0.02)); the two conv biases keep torch's
default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

`TorchBatchNorm` is torch's BatchNorm2d: the running variance is updated with the unbiased batch
variance, which `nnx.BatchNorm` does not do. `group_size` takes the statistics per group of that
many images, as each of the authors' DDP GPUs does (no SyncBatchNorm); 0 takes them over the whole
batch, wherever its shards are under jit. The authors call D on real and fake images separately,
so the statistics are per call.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from asymvq_jax.models.conv import conv_general_dilated

Dtype = Any
PAD1 = ((1, 1), (1, 1))


def _torch_default_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class TorchBatchNorm(nnx.Module):
    """`torch.nn.BatchNorm2d` semantics over the last (channel) axis of NHWC input.

    Variables: `scale`/`bias` (`nnx.Param`), `mean`/`var` (`nnx.BatchStat`).
    `momentum` is torch's (weight of the new batch statistic).
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, axis_name: str | None = None,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.axis_name = axis_name
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scale = nnx.Param(_normal(1.0, 0.02)(rngs.params(), (num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None, group_size: int = 0) -> jax.Array:
        """`group_size` images share batch statistics (0 = the whole batch): one GPU's share of the
        authors' DDP batch, as they use no SyncBatchNorm. The running stats take the groups' mean."""
        ura = self.use_running_average if use_running_average is None else use_running_average
        xf = x.astype(jnp.float32)
        if ura:
            y = (xf - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        else:
            batch = x.shape[0]
            size = group_size or batch
            if batch % size:
                raise ValueError(f"a batch of {batch} images does not split into groups of {size}")
            xg = xf.reshape((batch // size, size) + x.shape[1:])   # [groups, images, ..., channels]
            axes = tuple(range(1, xg.ndim - 1))
            n = math.prod(xg.shape[a] for a in axes)
            mean = jnp.mean(xg, axes, keepdims=True)
            if self.axis_name is None:  # two-pass variance for accuracy (centred)
                var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
            else:  # pmean-compatible form
                mean = jax.lax.pmean(mean, self.axis_name)
                sq = jax.lax.pmean(jnp.mean(jnp.square(xg), axes, keepdims=True), self.axis_name)
                n = n * jax.lax.psum(1, self.axis_name)
                var = jnp.maximum(sq - jnp.square(mean), 0.0)
            # torch stores the unbiased variance in running_var (a batch of one element
            # would divide by zero there too; torch raises for it in training mode).
            unbiased = var * (n / (n - 1))
            m, channels = self.momentum, (-1, x.shape[-1])
            batch_mean = jnp.mean(mean.reshape(channels), 0)
            batch_var = jnp.mean(unbiased.reshape(channels), 0)
            self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(batch_mean)
            self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(batch_var)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class NLayerDiscriminator(nnx.Module):
    """PatchGAN discriminator as in Pix2Pix / taming `NLayerDiscriminator`.

    `__call__(x)` takes NHWC images in [-1, 1] and returns NHWC logits `[B, h, w, 1]`.
    Call `.train()` (default after construction) for batch statistics with running-stat
    updates, `.eval()` to use the running stats.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 bn_axis_name: str | None = None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.param_dtype = param_dtype
        kinit = _normal(0.0, 0.02)

        def conv(cin, cout, stride, bias):
            return nnx.Conv(
                cin, cout, (4, 4), strides=(stride, stride), padding=PAD1, use_bias=bias,
                kernel_init=kinit, bias_init=_torch_default_bias_init(cin * 16),
                dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv_general_dilated, rngs=rngs,
            )

        def bn(c):
            return TorchBatchNorm(c, axis_name=bn_axis_name, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        convs = [conv(input_nc, ndf, 2, True)]
        norms = []
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            convs.append(conv(ndf * prev, ndf * mult, 2, False))
            norms.append(bn(ndf * mult))
        prev, mult = mult, min(2 ** n_layers, 8)
        convs.append(conv(ndf * prev, ndf * mult, 1, False))
        norms.append(bn(ndf * mult))
        convs.append(conv(ndf * mult, 1, 1, True))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array, *, group_size: int = 0) -> jax.Array:
        """`group_size`: images per BatchNorm group in train mode (0 = the whole batch)."""
        h = jax.nn.leaky_relu(self.convs[0](x.astype(self.dtype)), 0.2)
        for conv, norm in zip(self.convs[1:-1], self.norms):
            h = jax.nn.leaky_relu(norm(conv(h), group_size=group_size), 0.2)
        return self.convs[-1](h)
