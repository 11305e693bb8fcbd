"""The convolution every trained layer runs: `lax.conv_general_dilated`, with its kernel gradient
computed as matrix products on the CPU.

XLA's CPU kernel for a convolution's kernel gradient (the input correlated with the output's
cotangent) is slow at high resolution: at 128x128x128 a 3x3 one ran at a fifth of torch's rate,
and a 1x1 or a conv with 3 output channels (conv_out) at a fifth too, while its forward and
input-gradient kernels are on par with torch's. A kernel gradient is a sum over pixels of outer
products, so it can be written as dots with the pixels as the contracted dimension, which XLA runs
at its matmul rate. On TPU and GPU XLA's own convolution gradients are fast, and the forward is the
same here either way, so the formulation changes only where the work runs, never the forward's
values; `KERNEL_GRAD` chooses (see `kernel_grad_mode`).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

# "auto": as dots on the CPU backend, XLA's own elsewhere; "dots" or "xla" everywhere. Read when a
# function is traced: a jitted function keeps the choice it was traced with.
KERNEL_GRAD = "auto"
KERNEL_GRAD_MODES = ("auto", "dots", "xla")
NHWC = ("NHWC", "HWIO", "NHWC")


def kernel_grad_mode() -> str:
    """"dots" or "xla": how the convolutions traced now take their kernel gradient."""
    if KERNEL_GRAD not in KERNEL_GRAD_MODES:
        raise ValueError(f"models.conv.KERNEL_GRAD={KERNEL_GRAD!r}: expected one of {', '.join(KERNEL_GRAD_MODES)}")
    if KERNEL_GRAD == "auto":
        return "dots" if jax.default_backend() == "cpu" else "xla"
    return KERNEL_GRAD


@contextlib.contextmanager
def kernel_grads(mode: str):
    """Traces inside take their kernel gradients as `mode` says (a benchmark's or a test's choice)."""
    global KERNEL_GRAD
    previous, KERNEL_GRAD = KERNEL_GRAD, mode
    try:
        kernel_grad_mode()
        yield
    finally:
        KERNEL_GRAD = previous


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`'s signature and forward. A plain NHWC x HWIO convolution (no
    dilation, no groups, no extra options) takes its kernel gradient as dots when
    `kernel_grad_mode()` says so; anything else is lax's convolution unchanged."""
    plain = (all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and feature_group_count == 1 and all(v is None for v in kwargs.values())
             and lhs.ndim == 4
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if not plain or kernel_grad_mode() == "xla":
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision)


def _plain_conv(x, kernel, strides, padding, precision):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, precision):
    return _plain_conv(x, kernel, strides, padding, precision)


def _conv_fwd(x, kernel, strides, padding, precision):
    return _plain_conv(x, kernel, strides, padding, precision), (x, kernel)


def _conv_bwd(strides, padding, precision, residuals, g):
    x, kernel = residuals
    # The input gradient is XLA's own (its transposed convolution is as fast as torch's on the CPU).
    dx = jax.vjp(lambda x: _plain_conv(x, kernel, strides, padding, precision), x)[1](g)[0]
    return dx, kernel_grad(x, g, kernel.shape, strides, padding, precision).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


# XLA's own kernel gradient treats the output's cotangent as a convolution kernel; on the CPU it held
# the matmul rate on images up to 64x64 with 3x3 and larger kernels, and fell to a fifth above that.
XLA_MAX_PIXELS = 64 * 64
# Up to this many output channels the cotangent, not the input, is shifted per tap (a few channels).
SHIFT_COTANGENT_MAX_CHANNELS = 8


def kernel_grad(x, g, kernel_shape, strides, padding, precision=None):
    """d<g, conv(x, k)>/dk for an NHWC x HWIO convolution, in float32 (k enters linearly, so no k)."""
    kh, kw, cin, cout = kernel_shape
    if x.shape[1] * x.shape[2] <= XLA_MAX_PIXELS and kh * kw >= 9 and cout > SHIFT_COTANGENT_MAX_CHANNELS:
        conv = lambda k: _plain_conv(x, k, strides, padding, precision)  # noqa: E731
        return jax.vjp(conv, jnp.zeros(kernel_shape, x.dtype))[1](g)[0].astype(jnp.float32)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    if strides == (1, 1) and cout <= SHIFT_COTANGENT_MAX_CHANNELS:
        return _shifted_cotangent(xp, g, kh, kw, precision)
    return _shifted_input(xp, g, kh, kw, strides, precision)


def _pixels_dot(a, b, precision):
    """sum over pixels of a's channels x b's: [..., A] x [..., B] -> [A, B], float32."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _shifted_input(xp, g, kh, kw, strides, precision):
    """One dot per tap: the padded input's window that the tap sees, against the cotangent."""
    n, oh, ow, _ = g.shape
    sh, sw = strides

    def window(i, j):
        return lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, xp.shape[3]),
                         (1, sh, sw, 1))
    return jnp.stack([jnp.stack([_pixels_dot(window(i, j), g, precision) for j in range(kw)]) for i in range(kh)])


def _shifted_cotangent(xp, g, kh, kw, precision):
    """Stride 1, few output channels: the cotangent shifted to each tap's place on the padded grid,
    the taps side by side, one dot against the padded input (copies of g, not of x)."""
    hp, wp = xp.shape[1:3]
    _, oh, ow, cout = g.shape
    shifted = [jnp.pad(g, ((0, 0), (i, hp - oh - i), (j, wp - ow - j), (0, 0))) for i in range(kh) for j in range(kw)]
    grad = _pixels_dot(xp, jnp.concatenate(shifted, axis=-1), precision)  # [cin, kh * kw * cout]
    return grad.reshape(-1, kh, kw, cout).transpose(1, 2, 0, 3)
