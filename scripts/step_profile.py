#!/usr/bin/env python
"""Where a training step's time goes: ours (jitted, XLA) against the authors' way of training in
PyTorch (bench.authors_train_step), part by part and convolution by convolution, on this device's
CPU, side by side in one process, same weights and batch, the GAN on, fp32.

  python scripts/step_profile.py                        # asym-base widths, 128 px, batch 2
  python scripts/step_profile.py --model asym-x1.5 --size 256 --batch 1

Parts (each jitted alone; the torch column does the same work with torch's autograd):
  forward          encode, sample, decode, LPIPS, D(x_rec): the loss terms, no gradient (torch: no_grad)
  generator        ours: make_decoder_grads (one backward; the adaptive weight from conv_out's VJPs);
                   theirs: optimizer 0 (forward, two autograd.grad calls, backward, Adam)
  discriminator    ours: D on real and x_rec, its gradient, Adam; theirs: optimizer 1 (a second forward first)
  step             the whole step
  LPIPS, D         forward, and with the gradient the step takes (at x_rec; at D's input; at D's weights)
  adaptive weight  ours: the conv_out kernel VJPs of d_nll and d_g; theirs: the two autograd.grad calls
                   (through LPIPS's and D's backward to conv_out, on a graph already built)
Convolutions: every convolution in our step's jaxpr (forward, input-gradient, weight-gradient) grouped
by the forward's shape, each timed alone under XLA and under torch's kernels (their outputs must agree).
The weight-gradients are found as XLA's autodiff writes them; the "ours" column times each as the step
computes it (models.conv: as dots on the CPU, see kernel_grad), and equals XLA's for the other kinds.
"""

import argparse
import collections
import copy
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench  # noqa: E402
from conv_profile import best_time, conv_gflop  # noqa: E402

# ConvDimensionNumbers of NHWC x HWIO convolutions and of the two transposes jax's autodiff makes of them.
KINDS = {((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)): "forward",
         ((0, 3, 1, 2), (2, 3, 0, 1), (0, 3, 1, 2)): "input-grad",
         ((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1)): "weight-grad"}


# -- parts -------------------------------------------------------------------------------------

def parts(config, graphdefs, state, fixed, tx, disc_tx, x, mask):
    """{part: (ours run(), theirs run())}, same weights and batch."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    from asymvq_jax.losses import gan
    from asymvq_jax.train.state import merge_vae
    from asymvq_jax.train.step import apply_disc, make_decoder_grads, make_train_step
    batch = {"image": x, "mask": mask}
    d_params, d_stats = state["disc"]["params"], state["disc"]["stats"]
    key = jax.random.key(0)

    def lpips(fixed):
        return nnx.merge(graphdefs["lpips"], fixed["lpips"])

    def decode(state, fixed, x, mask):
        vae = merge_vae(graphdefs["vae"], state["params"], fixed["frozen"])
        return vae.decode(vae.encode(x).sample(key), x, mask)

    def forward(state, fixed, x, mask):
        x_rec = decode(state, fixed, x, mask)
        nll = gan.reconstruction_nll(x, x_rec, lpips(fixed)(x, x_rec))
        return nll, gan.generator_loss(apply_disc(graphdefs["disc"], d_params, d_stats, x_rec)[0])

    def disc_step(state, x, x_rec):
        def loss(p):
            real, stats = apply_disc(graphdefs["disc"], p, d_stats, x)
            fake, stats = apply_disc(graphdefs["disc"], p, stats, x_rec)
            return gan.hinge_d_loss(real, fake), stats
        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(state["disc"]["params"])
        updates, opt = disc_tx.update(grads, state["disc_opt"], state["disc"]["params"])
        return optax.apply_updates(state["disc"]["params"], updates), stats, opt

    conv_out = state["params"]["decoder"]["conv_out"]["kernel"]
    h = jnp.ones(x.shape[:3] + conv_out.shape[2:3], jnp.float32)

    def kernel_vjps(h, d_nll, d_g):  # the adaptive weight's two conv_out kernel VJPs (one group)
        conv = lambda k: jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        vjp = jax.vjp(conv, conv_out)[1]
        return vjp(d_nll)[0], vjp(d_g)[0]

    x_rec = jax.jit(decode)(state, fixed, x, mask)
    ours = {
        "forward": (jax.jit(forward), (state, fixed, x, mask)),
        "generator": (jax.jit(make_decoder_grads(config, graphdefs)), (state, fixed, batch)),
        "discriminator": (jax.jit(disc_step), (state, x, x_rec)),
        "step": (jax.jit(make_train_step(config, graphdefs, tx, disc_tx)), (state, fixed, batch)),
        "LPIPS forward": (jax.jit(lambda f, x, y: lpips(f)(x, y)), (fixed, x, x_rec)),
        "LPIPS + grad at x_rec": (jax.jit(jax.grad(lambda y, f, x: jnp.sum(lpips(f)(x, y)))), (x_rec, fixed, x)),
        "D forward": (jax.jit(lambda p, y: apply_disc(graphdefs["disc"], p, d_stats, y)[0]), (d_params, x_rec)),
        "D + grad at input": (jax.jit(jax.grad(lambda y, p: jnp.sum(apply_disc(graphdefs["disc"], p, d_stats, y)[0]))),
                              (x_rec, d_params)),
        "D + grad at weights": (jax.jit(jax.grad(lambda p, y: jnp.sum(apply_disc(graphdefs["disc"], p, d_stats, y)[0]))),
                                (d_params, x_rec)),
        "adaptive weight VJPs": (jax.jit(kernel_vjps), (h, x_rec, x_rec)),
    }
    runs = {}
    for name, (fn, args) in ours.items():
        compiled = fn.lower(*args).compile()
        runs[name] = [lambda c=compiled, a=args: jax.block_until_ready(c(*a))]

    vae, perceptual, disc = bench.torch_models(config, graphdefs, state, fixed)
    step = bench.authors_train_step(config, vae, perceptual, disc)
    tx_, tmask = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, mask))
    trec = torch.from_numpy(x_rec.__array__().transpose(0, 3, 1, 2).copy())

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def graph():
        """Optimizer 0's graph, for the adaptive weight's two autograd.grad calls, built on copies of the
        models: the other parts' Adam steps update the originals in place, and autograd refuses a graph
        whose saved weights have changed since."""
        vae_, disc_ = copy.deepcopy(vae), copy.deepcopy(disc)
        forward = bench.authors_train_step(config, vae_, perceptual, disc_).forward
        vae_.decoder.requires_grad_(True)
        disc_.requires_grad_(False)
        x_rec, nll, _ = forward(tx_, tmask, None)
        return vae_.decoder.conv_out.weight, nll, -torch.mean(disc_(x_rec))
    last_layer, nll, g_loss = graph()

    def adaptive_weight_grads():
        return (torch.autograd.grad(nll, last_layer, retain_graph=True),
                torch.autograd.grad(g_loss, last_layer, retain_graph=True))

    def with_grad(fn, wrt):
        def run():
            wrt.requires_grad_(True)
            torch.autograd.grad(fn(), wrt)
        return run

    theirs = {
        "forward": no_grad(lambda: (step.forward(tx_, tmask, None), disc(trec))),
        "generator": lambda: step.generator(tx_, tmask, 1.0),
        "discriminator": lambda: step.discriminator(tx_, tmask, 1.0),
        "step": lambda: step(tx_, tmask, config.loss.disc_start),
        "LPIPS forward": no_grad(lambda: perceptual(tx_, trec)),
        "LPIPS + grad at x_rec": with_grad(lambda: perceptual(tx_, trec).sum(), trec),
        "D forward": no_grad(lambda: disc(trec)),
        "D + grad at input": with_grad(lambda: disc.requires_grad_(False)(trec).sum(), trec),
        "D + grad at weights": lambda: torch.autograd.grad(disc.requires_grad_(True)(tx_).sum(),
                                                           list(disc.parameters())),
        "adaptive weight VJPs": adaptive_weight_grads,
    }
    for name, run in theirs.items():
        runs[name].append(run)
    return runs


# -- convolutions ------------------------------------------------------------------------------

def step_convs(config, graphdefs, state, fixed, tx, disc_tx, batch) -> collections.Counter:
    """{(kind, forward input shape, kernel shape, strides, padding): count} over our jitted step."""
    import jax
    import jax.extend

    from asymvq_jax.models import conv
    from asymvq_jax.train.step import make_train_step
    found = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                dn = p["dimension_numbers"]
                kind = KINDS[(dn.lhs_spec, dn.rhs_spec, dn.out_spec)]
                lhs, rhs, out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
                if kind == "forward":
                    key = (lhs, rhs, p["window_strides"], tuple(map(tuple, p["padding"])))
                elif kind == "input-grad":  # lhs: the output's cotangent; the forward's low padding is k-1-lo
                    key = (out, rhs, p["lhs_dilation"], tuple((k - 1 - lo, None) for k, (lo, _) in zip(rhs, p["padding"])))
                else:  # lhs: the forward's input, the output: its kernel
                    key = (lhs, out, p["rhs_dilation"], tuple((lo, None) for lo, _ in p["padding"]))
                found[(kind, *key)] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    with conv.kernel_grads("xla"):  # every weight-gradient a convolution, found by its layout
        walk(jax.make_jaxpr(make_train_step(config, graphdefs, tx, disc_tx))(state, fixed, batch).jaxpr)
    # The gradients' keys name the forward by its low padding: take the high one from that forward.
    forwards = [key[1:] for key in found if key[0] == "forward"]
    counts = collections.Counter()
    for (kind, shape, kernel, strides, padding), n in found.items():
        match = next(f for f in forwards if f[:3] == (shape, kernel, strides)
                     and all(lo == flo for (lo, _), (flo, _) in zip(padding, f[3])))
        counts[(kind, *match)] += n
    return counts


def time_kind(kind, shape, kernel, strides, padding, reps) -> tuple[float, float, float]:
    """(XLA s, torch s, ours s) for one convolution or one of its two gradients, ours as our step computes
    it (models.conv); the outputs must agree."""
    import jax
    import numpy as np
    import torch

    from asymvq_jax.models import conv as ours
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32)
    k = (rng.standard_normal(kernel) / np.sqrt(np.prod(kernel[:3]))).astype(np.float32)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    g = rng.standard_normal(jax.eval_shape(conv, x, k).shape, np.float32)
    if kind == "forward":
        fn, args = (lambda x, k, g: conv(x, k)), (x, k, g)
    elif kind == "input-grad":
        fn, args = (lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]), (x, k, g)
    else:
        fn, args = (lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]), (x, k, g)
    args = [jax.device_put(a) for a in args]
    compiled = jax.jit(fn).lower(*args).compile()
    want = np.asarray(compiled(*args))
    xla = best_time(lambda: compiled(*args).block_until_ready(), reps)
    mine = xla
    if kind == "weight-grad" and ours.kernel_grad_mode() == "dots":
        ours_fn = jax.jit(lambda x, g: ours.kernel_grad(x, g, kernel, strides, padding)).lower(*args[::2]).compile()
        np.testing.assert_allclose(ours_fn(*args[::2]), want, atol=1e-4 * np.abs(want).max(), rtol=0)
        mine = best_time(lambda: ours_fn(*args[::2]).block_until_ready(), reps)

    # torch pads symmetrically: pad the input by hand (the decoder's sub-pixel upsampling convs are
    # 2x2 with one-sided padding), and crop the input-gradient back to the unpadded input.
    (top, bottom), (left, right) = padding
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    tx = torch.nn.functional.pad(nchw(x), (left, right, top, bottom)).contiguous()
    tk, tg = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()), nchw(g)
    if kind == "forward":
        run, to_ours = (lambda: torch.nn.functional.conv2d(tx, tk, stride=strides)), (lambda t: t.permute(0, 2, 3, 1))
    elif kind == "input-grad":
        run = lambda: torch.nn.grad.conv2d_input(tx.shape, tk, tg, stride=strides)  # noqa: E731
        to_ours = lambda t: t[:, :, top:top + shape[1], left:left + shape[2]].permute(0, 2, 3, 1)  # noqa: E731
    else:
        run = lambda: torch.nn.grad.conv2d_weight(tx, tk.shape, tg, stride=strides)  # noqa: E731
        to_ours = lambda t: t.permute(2, 3, 1, 0)  # noqa: E731
    with torch.inference_mode():
        got = to_ours(run()).numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=1e-3 * scale, rtol=0, err_msg=f"{kind} {shape} {kernel}")
        ref = best_time(run, reps)
    return xla, ref, mine


# -- report ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="asym-base")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gan-group-size", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-parts", action="store_true")
    parser.add_argument("--skip-convs", action="store_true")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    config, (graphdefs, state, fixed, tx, disc_tx) = bench.train_setup(args.model, args.size, args.batch,
                                                                        args.gan_group_size)
    x, mask, _ = bench.inputs(args.batch, args.size)
    print(f"{args.model}, {args.size} px, batch {args.batch}, gan_group_size {args.gan_group_size}, GAN on, fp32; "
          f"torch on {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}\n")
    if not args.skip_parts:
        runs = parts(config, graphdefs, state, fixed, tx, disc_tx, x, mask)
        flat = {f"{name}|{who}": run for name, pair in runs.items() for who, run in zip(("xla", "torch"), pair)}
        times = bench.side_by_side(flat, args.reps)
        print("| part | XLA s | torch s | XLA / torch | XLA CPU s | torch CPU s |\n|---|---|---|---|---|---|")
        for name in runs:
            med = {who: statistics.median(times[f"{name}|{who}"]) for who in ("xla", "torch")}
            cpu = {who: statistics.median(times[f"{name}|{who}_cpu"]) for who in ("xla", "torch")}
            print(f"| {name} | {med['xla']:.3f} | {med['torch']:.3f} | {med['xla'] / med['torch']:.2f} "
                  f"| {cpu['xla']:.2f} | {cpu['torch']:.2f} |")
        print(f"\nload average after the parts: {os.getloadavg()[0]:.1f}\n")
    if not args.skip_convs:
        counts = step_convs(config, graphdefs, state, fixed, tx, disc_tx, {"image": x, "mask": mask})
        totals = collections.defaultdict(collections.Counter)
        rows = []
        for (kind, shape, kernel, strides, padding), n in sorted(counts.items(),
                                                                 key=lambda kv: -kv[1] * conv_gflop(*kv[0][1:])):
            gflop = conv_gflop(shape, kernel, strides, padding)
            xla, ref, mine = time_kind(kind, shape, kernel, strides, padding, args.reps)
            totals[kind].update({"gflop": n * gflop, "xla": n * xla, "torch": n * ref, "ours": n * mine})
            pads = " / ".join(f"{lo},{hi}" for lo, hi in padding)
            rows.append(f"| {kind} | {'x'.join(map(str, shape[1:]))} | {'x'.join(map(str, kernel))} | {strides[0]} "
                        f"| {pads} | {n} | {gflop / xla:.0f} | {gflop / ref:.0f} | {gflop / mine:.0f} | {n * xla:.3f} "
                        f"| {n * ref:.3f} | {n * mine:.3f} |")
        print("| kind | input HxWxC | kernel | stride | padding | count | XLA GFLOP/s | torch GFLOP/s | ours GFLOP/s "
              "| XLA s | torch s | ours s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        for kind, t in totals.items():
            print(f"| {kind}: all | | | | | | {t['gflop'] / t['xla']:.0f} | {t['gflop'] / t['torch']:.0f} "
                  f"| {t['gflop'] / t['ours']:.0f} | {t['xla']:.2f} | {t['torch']:.2f} | {t['ours']:.2f} |")
        gflop, xla, ref, mine = (sum(t[k] for t in totals.values()) for k in ("gflop", "xla", "torch", "ours"))
        print(f"\n{gflop:.0f} GFLOP of convolutions in our step: XLA's kernels {xla:.2f} s, torch's {ref:.2f} s "
              f"({xla / ref:.2f}x), as our step runs them {mine:.2f} s ({mine / ref:.2f}x); "
              f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
