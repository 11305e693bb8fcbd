"""Building blocks shared by the encoder and the decoders (NHWC, diffusers naming)."""

import jax
import jax.numpy as jnp
from flax import nnx

from asymvq_jax.models.conv import conv_general_dilated


def torch_default_init(fan_in: int):
    """torch's default for Conv2d and Linear, weights and biases alike: U(+-1/sqrt(fan_in)) (for the
    weights, kaiming_uniform with a = sqrt(5)). The authors' new layers start from it; loaded
    weights replace it."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


FRESH_INITS = ("torch", "lecun")


def fresh_init(name: str, fan_in: int) -> dict:
    """The kernel and bias initialisers of a new conv or linear: "torch" (the authors'), or "lecun",
    flax's default (lecun-normal weights, 3x torch's variance, and zero biases)."""
    if name == "torch":
        return {"kernel_init": torch_default_init(fan_in), "bias_init": torch_default_init(fan_in)}
    if name == "lecun":
        return {"kernel_init": nnx.initializers.lecun_normal(), "bias_init": nnx.initializers.zeros_init()}
    raise ValueError(f"fresh_init={name!r}: expected one of {', '.join(FRESH_INITS)}")


class LayerFactory:
    """Makes the layers (conv, GroupNorm, linear), all with one compute and one storage dtype, each
    conv and linear starting from `init` (see `fresh_init`)."""

    def __init__(self, dtype=jnp.float32, param_dtype=jnp.float32, init: str = "torch"):
        fresh_init(init, 1)  # a bad name fails here, before any layer is made
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.init = init

    def conv(self, cin, cout, kernel, rngs, *, stride=1, padding=None, use_bias=True):
        if padding is None:
            padding = kernel // 2
        pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
        return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=pad, use_bias=use_bias,
                        **fresh_init(self.init, cin * kernel * kernel), dtype=self.dtype,
                        param_dtype=self.param_dtype, conv_general_dilated=conv_general_dilated, rngs=rngs)

    def group_norm(self, channels, groups, rngs, eps=1e-6):
        # Two-pass variance, as torch computes it: the one-pass form drifts from diffusers.
        return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                             dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def linear(self, cin, cout, rngs):
        return nnx.Linear(cin, cout, **fresh_init(self.init, cin), dtype=self.dtype, param_dtype=self.param_dtype,
                          rngs=rngs)


def own_statistics(norm: nnx.GroupNorm, x):
    return norm(x)


def group_norm_with(norm: nnx.GroupNorm, x, mean, var):
    """`norm` with given per-group mean and variance [B, G] in place of x's own; nnx's arithmetic."""
    mean, var = (jnp.repeat(s, norm.group_size, axis=1)[:, None, None, :] for s in (mean, var))
    x, scale, bias = norm.promote_dtype((x, norm.scale[...], norm.bias[...]), dtype=norm.dtype)
    return ((x - mean) * (jax.lax.rsqrt(var + norm.epsilon) * scale) + bias).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """GN-SiLU-conv3x3-GN-SiLU-conv3x3 with a 1x1 shortcut when the width changes."""

    def __init__(self, cin, cout, groups, make: LayerFactory, rngs):
        self.norm1 = make.group_norm(cin, groups, rngs)
        self.conv1 = make.conv(cin, cout, 3, rngs)
        self.norm2 = make.group_norm(cout, groups, rngs)
        self.conv2 = make.conv(cout, cout, 3, rngs)
        self.conv_shortcut = make.conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x, normalize=own_statistics):
        return resnet_second_half(self.norm2, self.conv2, self.first_half(x, normalize), normalize)

    # The halves start at the GroupNorms, where a tiled decode puts in the whole image's statistics
    # (`normalize`); see `Decoder.segments`.
    def first_half(self, x, normalize=own_statistics):
        """norm1 .. conv1, and the shortcut: (residual, norm2's input)."""
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return residual, self.conv1(nnx.silu(normalize(self.norm1, x)))


def resnet_second_half(norm, conv, carry, normalize=own_statistics):
    """A ResNet block's norm2 .. conv2, and the residual. A function of those two layers rather than of
    the block, so the second halves of one width are one program to jit whether or not their block
    has a shortcut."""
    residual, h = carry
    return residual + conv(nnx.silu(normalize(norm, h)))


ATTENTION_CHUNK = 1024  # queries per step: a 2048 px image (256x256 latent) holds 1024 x 65536 logits


class Attention(nnx.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels, groups, make: LayerFactory, rngs):
        self.group_norm = make.group_norm(channels, groups, rngs)
        self.to_q = make.linear(channels, channels, rngs)
        self.to_k = make.linear(channels, channels, rngs)
        self.to_v = make.linear(channels, channels, rngs)
        self.to_out = nnx.List([make.linear(channels, channels, rngs)])

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        y = self.to_out[0](attend(self.to_q(y), self.to_k(y), self.to_v(y), ATTENTION_CHUNK))
        return x + y.reshape(b, h, w, c)


def attend(q, k, v, chunk: int = 1024):
    """softmax(q k^T / sqrt(c)) v, `chunk` queries at a time: the logits take chunk x HW, not HW x HW."""
    b, n, c = q.shape

    def rows(qc):
        logits = jnp.einsum("bqc,bkc->bqk", qc, k) / jnp.sqrt(c).astype(qc.dtype)
        # Softmax in float32 even under bf16 compute, as diffusers upcasts it.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", weights, v)

    if n <= chunk:
        return rows(q)
    pad = -n % chunk
    chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, c).swapaxes(0, 1)
    out = jax.lax.map(rows, chunks)
    return out.swapaxes(0, 1).reshape(b, n + pad, c)[:, :n]


class Downsample(nnx.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels, make: LayerFactory, rngs):
        self.conv = make.conv(channels, channels, 3, rngs, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest x2, then a 3x3 conv; computed as four 2x2 convs on the small input, one per output
    phase (the taps that land on the same input pixel summed): 4/9 of the multiplies."""

    def __init__(self, channels, make: LayerFactory, rngs):
        self.conv = make.conv(channels, channels, 3, rngs)

    def __call__(self, x):
        n, h, w, _ = x.shape
        rows = []
        for p, row_kernel in enumerate(_phase_taps(self.conv.kernel[...], axis=0)):
            rows.append(jnp.stack([conv_with(self.conv, x, kernel, ((1 - p, p), (1 - q, q)))
                                   for q, kernel in enumerate(_phase_taps(row_kernel, axis=1))], axis=3))
        return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, -1)


def _phase_taps(kernel, axis):
    """A 3-tap kernel axis on the upsampled grid -> 2 taps on the input, for output phases 0 and 1."""
    t0, t1, t2 = (jnp.take(kernel, k, axis=axis) for k in range(3))
    return jnp.stack([t0, t1 + t2], axis), jnp.stack([t0 + t1, t2], axis)


def conv_with(conv: nnx.Conv, x, kernel, padding, strides=(1, 1)):
    """`conv`'s dtype, precision and bias around another kernel (a reformulation of its own)."""
    x, kernel, bias = conv.promote_dtype((x, kernel, conv.bias[...]), dtype=conv.dtype)
    y = conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             precision=conv.precision)
    return y + bias


def remat_policy(remat: bool | str):
    """False/"" = no remat; True/"full" = keep only each block's input; else a `jax.checkpoint_policies` name."""
    if remat is True or remat == "full":
        return None
    if not hasattr(jax.checkpoint_policies, remat):
        raise ValueError(f"remat={remat!r}: use '', 'full' or a jax.checkpoint_policies name such as "
                         "'dots_saveable'")
    return getattr(jax.checkpoint_policies, remat)


def call_block(block, x, remat: bool | str):
    """Runs a block, rematerialising its activations in the backward pass if asked (`remat_policy`)."""
    if not remat:
        return block(x)
    return nnx.remat(lambda m, y: m(y), policy=remat_policy(remat))(block, x)


class MidBlock(nnx.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels, groups, make: LayerFactory, rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, make, rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, make, rngs)])

    def __call__(self, x, remat=False):
        x = call_block(self.resnets[0], x, remat)
        x = call_block(self.attentions[0], x, remat)
        return call_block(self.resnets[1], x, remat)


class DownBlock(nnx.Module):
    def __init__(self, cin, cout, layers, groups, add_downsample, make: LayerFactory, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, make, rngs)
                                 for i in range(layers)])
        self.downsamplers = nnx.List([Downsample(cout, make, rngs)] if add_downsample else [])

    def __call__(self, x, remat=False):
        for resnet in self.resnets:
            x = call_block(resnet, x, remat)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nnx.Module):
    """ResNets, then x2 upsampling; the decoder runs them in segments (`Decoder.segments`)."""

    def __init__(self, cin, cout, layers, groups, add_upsample, make: LayerFactory, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, make, rngs)
                                 for i in range(layers)])
        self.upsamplers = nnx.List([Upsample(cout, make, rngs)] if add_upsample else [])
