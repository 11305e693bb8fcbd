"""The convolutions' kernel gradient as dots (models.conv, the CPU's formulation) equals XLA's own.

Tolerance: float32 at highest precision, each kernel gradient within 1e-5 of its largest element
(the two sum the same products in another order; measured up to 6e-7). The forward and the input
gradient are XLA's in both, so they must agree bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asymvq_jax.models import conv
from asymvq_jax.models.blocks import Downsample, LayerFactory, ResnetBlock, Upsample
from asymvq_jax.models.conv import conv_general_dilated

TOL = 1e-5


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


# (input NHWC, kernel HWIO, strides, padding, the formulation "dots" mode takes): the models' kinds of
# convolution, at sizes that reach each branch of conv.kernel_grad.
CASES = {
    "3x3": ((2, 72, 72, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), "input"),
    "3x3 to 3 channels (conv_out)": ((2, 72, 72, 16), (3, 3, 16, 3), (1, 1), ((1, 1), (1, 1)), "cotangent"),
    "1x1 (shortcut)": ((2, 72, 72, 16), (1, 1, 16, 8), (1, 1), ((0, 0), (0, 0)), "input"),
    "3x3 stride 2 (downsample)": ((2, 73, 73, 8), (3, 3, 8, 8), (2, 2), ((0, 0), (0, 0)), "input"),
    "4x4 stride 2 (discriminator)": ((2, 72, 72, 3), (4, 4, 3, 16), (2, 2), ((1, 1), (1, 1)), "input"),
    "2x2 one-sided (upsampling phase)": ((2, 72, 72, 8), (2, 2, 8, 8), (1, 1), ((1, 0), (0, 1)), "input"),
    "3x3 on a small image": ((2, 16, 16, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), "xla"),
}


def conv_vjp(mode, x, kernel, strides, padding, g):
    with conv.kernel_grads(mode):
        def f(x, k):
            return conv_general_dilated(x, k, strides, padding, dimension_numbers=conv.NHWC)
        y, vjp = jax.vjp(f, x, kernel)
        jaxpr = jax.make_jaxpr(lambda x, k, g: jax.vjp(f, x, k)[1](g))(x, kernel, g)
    return y, *vjp(g), jaxpr


def kernel_grad_convs(jaxpr) -> int:
    """How many convolutions compute a kernel gradient (jax's autodiff writes them with the kernel's
    HWIO as the output's layout)."""
    return sum(eqn.primitive.name == "conv_general_dilated" and eqn.params["dimension_numbers"].out_spec == (2, 3, 0, 1)
               for eqn in jaxpr.eqns) + sum(kernel_grad_convs(sub) for eqn in jaxpr.eqns
                                            for sub in jax.extend.core.jaxprs_in_params(eqn.params))


@pytest.mark.parametrize("name", CASES)
def test_kernel_gradient_as_dots_equals_xlas(name):
    shape, kernel_shape, strides, padding, formulation = CASES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal(kernel_shape, np.float32))
    y = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                                            dimension_numbers=conv.NHWC))
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    y_xla, dx_xla, dk_xla, jaxpr_xla = conv_vjp("xla", x, kernel, strides, padding, g)
    y_dots, dx_dots, dk_dots, jaxpr_dots = conv_vjp("dots", x, kernel, strides, padding, g)
    np.testing.assert_array_equal(y_dots, y_xla)
    np.testing.assert_array_equal(dx_dots, dx_xla)
    err = float(jnp.max(jnp.abs(dk_dots - dk_xla)) / jnp.max(jnp.abs(dk_xla)))
    print(f"{name}: kernel gradient within {err:.1e} of its largest element")
    assert err < TOL
    # The kernel gradient is a convolution only where XLA's is kept.
    assert kernel_grad_convs(jaxpr_xla.jaxpr) == 1
    assert kernel_grad_convs(jaxpr_dots.jaxpr) == (formulation == "xla")


def test_auto_takes_dots_on_the_cpu_only_and_a_bad_mode_is_refused():
    with conv.kernel_grads("auto"):
        assert conv.kernel_grad_mode() == ("dots" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="KERNEL_GRAD='matmul': expected one of auto, dots, xla"):
        with conv.kernel_grads("matmul"):
            pass
    assert conv.KERNEL_GRAD == "auto"


def test_model_and_discriminator_gradients_as_dots_equal_xlas(monkeypatch):
    """Every trained convolution goes through models.conv: the layers' nnx.Conv (a ResNet block with
    its 1x1 shortcut, the stride-2 downsampling), the sub-pixel upsampling convolutions and the
    discriminator's. With the XLA branch shut off (XLA_MAX_PIXELS 0) each takes its kernel gradient
    as dots, and the gradients equal XLA's. (Under remat: test_models.test_remat_keeps_values_and_gradients,
    whose models take "auto".)"""
    from asymvq_jax.losses import NLayerDiscriminator
    monkeypatch.setattr(conv, "XLA_MAX_PIXELS", 0)

    def build():
        make, rngs = LayerFactory(), nnx.Rngs(3)
        layers = nnx.List([make.conv(3, 4, 3, rngs), ResnetBlock(4, 8, 4, make, rngs), Downsample(8, make, rngs),
                           Upsample(8, make, rngs), make.conv(8, 3, 3, rngs)])
        disc = NLayerDiscriminator(ndf=8, n_layers=2, rngs=nnx.Rngs(4))
        disc.eval()  # running statistics: nothing mutates inside the trace
        return layers, disc

    # Shapes only, then numpy's values: jax's initialisers would compile once per shape.
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params, rest = (jax.tree.map(lambda a: jnp.asarray(rng.uniform(lo, hi, a.shape).astype(np.float32)), tree)
                    for tree, lo, hi in ((params, -0.5, 0.5), (rest, 0.5, 1.0)))  # rest: BatchNorm's statistics
    x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))

    def loss(params):
        layers, disc = nnx.merge(graphdef, params, rest)
        y = x
        for layer in layers:
            y = layer(y)
        return jnp.mean(y ** 2) + jnp.mean(disc(y))

    grads, convs = {}, {}
    for mode in ("xla", "dots"):
        with conv.kernel_grads(mode):
            traced = jax.jit(jax.grad(loss)).trace(params)
        convs[mode] = kernel_grad_convs(traced.jaxpr.jaxpr)
        grads[mode] = traced.lower().compile()(params)
    kernels = [k for k in jax.tree.leaves(params) if k.ndim == 4]
    assert convs["dots"] == 0 and convs["xla"] == len(kernels) + 3  # four per upsampling conv
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads["xla"])[0], jax.tree.leaves(grads["dots"])):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
        assert err < TOL, (jax.tree_util.keystr(path), err)
