#!/usr/bin/env python
"""Where a decode's time goes, convolution by convolution, and how XLA's kernels compare with
torch's on the very same convolutions (this device's CPU, side by side in one process).

  python scripts/conv_profile.py                          # x1.5, mask-guided, 256 px, fp32, batch 1
  python scripts/conv_profile.py --model asym-base --size 512 --op decode

Every convolution of the jitted decode is read from its jaxpr and grouped by shape; each shape is
timed alone under XLA and under torch.nn.functional.conv2d (best of --reps), then multiplied by how
often the decode runs it. Convolutions are most of a decode's time, so the totals say how fast
the decode could be with either library's kernels.
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def decode_convs(model: str, size: int, op: str) -> collections.Counter:
    """{(input shape, kernel shape, strides, padding): count} of the jitted decode's convolutions."""
    import jax
    import jax.extend
    import jax.numpy as jnp
    from flax import nnx

    from asymvq_jax.models import AutoencoderKL, preset
    vae = nnx.eval_shape(lambda: AutoencoderKL(preset(model), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    z = jnp.zeros((1, size // 8, size // 8, vae.config.latent_channels))
    image, mask = jnp.zeros((1, size, size, 3)), jnp.zeros((1, size, size, 1))

    def decode(state, z, image, mask):
        model = nnx.merge(graphdef, state)
        return model.decode(z, image, mask) if op == "guided" else model.decode(z)

    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                if any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])) or p["feature_group_count"] != 1:
                    raise NotImplementedError(f"dilated or grouped convolution: {p}")
                counts[(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, p["window_strides"],
                        tuple(map(tuple, p["padding"])))] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(decode)(state, z, image, mask).jaxpr)
    return counts


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def conv_gflop(shape, kernel_shape, strides, padding) -> float:
    """Multiply-adds x 2 of one NHWC x HWIO convolution, in GFLOP."""
    (top, bottom), (left, right) = padding
    out_h = (shape[1] + top + bottom - kernel_shape[0]) // strides[0] + 1
    out_w = (shape[2] + left + right - kernel_shape[1]) // strides[1] + 1
    return 2 * shape[0] * out_h * out_w * kernel_shape[0] * kernel_shape[1] * kernel_shape[2] * kernel_shape[3] / 1e9


def time_conv(shape, kernel_shape, strides, padding, reps: int) -> tuple[float, float]:
    """(XLA seconds, torch seconds) for one NHWC x HWIO convolution; the two outputs must agree."""
    import jax
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    k = (rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3]))).astype(np.float32)
    xla = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, strides, padding,
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))
    jx, jk = jax.device_put(x), jax.device_put(k)
    out = xla(jx, jk)
    seconds_xla = best_time(lambda: xla(jx, jk).block_until_ready(), reps)
    (top, bottom), (left, right) = padding
    tx = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom)).contiguous()
    tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
    with torch.inference_mode():
        ref = torch.nn.functional.conv2d(tx, tk, stride=strides)
        np.testing.assert_allclose(ref.permute(0, 2, 3, 1).numpy(), np.asarray(out), atol=1e-3, rtol=1e-3)
        seconds_torch = best_time(lambda: torch.nn.functional.conv2d(tx, tk, stride=strides), reps)
    return seconds_xla, seconds_torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="asym-x1.5")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--op", choices=("guided", "decode"), default="guided")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)

    rows, totals = [], collections.Counter()
    convs = decode_convs(args.model, args.size, args.op)
    for (shape, kernel, strides, padding), count in sorted(convs.items(), key=lambda kv: -kv[1] * conv_gflop(*kv[0])):
        gflop = conv_gflop(shape, kernel, strides, padding)
        xla, ref = time_conv(shape, kernel, strides, padding, args.reps)
        totals.update({"gflop": count * gflop, "xla": count * xla, "torch": count * ref})
        pads = " / ".join(f"{lo},{hi}" for lo, hi in padding)
        rows.append(f"| {'x'.join(map(str, shape[1:]))} | {'x'.join(map(str, kernel))} | {strides[0]} | {pads} | {count} "
                    f"| {gflop / xla:.0f} | {gflop / ref:.0f} | {count * xla:.2f} | {count * ref:.2f} |")
    print(f"{args.model}, {args.op} at {args.size} px, fp32, batch 1; torch on {args.threads} threads\n")
    print("| input HxWxC | kernel | stride | padding (rows / cols) | count | XLA GFLOP/s | torch GFLOP/s | XLA s | torch s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"| all | | | | | {totals['gflop'] / totals['xla']:.0f} | {totals['gflop'] / totals['torch']:.0f} "
          f"| {totals['xla']:.2f} | {totals['torch']:.2f} |")
    print(f"\n{totals['gflop']:.0f} GFLOP of convolutions; torch's kernels would run them "
          f"{totals['xla'] / totals['torch']:.2f}x as fast as XLA's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
