#!/usr/bin/env python
"""Speed of our jitted encode / decode / mask-guided decode against diffusers' PyTorch models with the
same (random) weights, side by side in one process, and of the training step.

  python bench.py                     # every preset, 256 and 512 px, fp32 and bf16, batch 1 and 4
  python bench.py --quick             # x1.5 at 256 px, fp32, batch 1: a few minutes on a 2-core CPU
  python bench.py --models asym-x1.5 --sizes 256 --ops guided --reps 5 --json out.json
  python bench.py --quick --family flux   # the same sizes on FLUX latents (16 channels, no quant convs)
  python bench.py --ops train --models asym-x1.5 --sizes 256 --batches 1 --reps 3   # the training step
  python bench.py --ops train --models asym-x1.5 --sizes 128 --batches 2 --gan-group-sizes 0,1

The training step ("train") is ours against the authors' way of training in PyTorch (bench.authors_train_step:
diffusers' AsymmetricAutoencoderKL, lpips' LPIPS-VGG and taming's PatchGAN with our weights, two optimizer
passes, a second forward, the adaptive weight by autograd), the GAN on, fp32; its "diff" columns are that step.

Ours and diffusers' runs alternate, so both see the same load; "speedup" is diffusers' wall time
over ours, "CPU-time" the same ratio of this process's CPU seconds (steadier on a shared machine).
FLOPs come from the compiled computation (XLA's cost analysis); MFU divides them by the device's
peak (see `peak_flops`).
"""

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time

# torch's OpenMP threads spin while they wait for each other; on a shared machine a spinning thread holds
# a core another one needs. Measured on this 2-core machine at load 8: the authors-style training step
# took 13-32 s wall (8-19 s CPU) spinning, 5 s (3.2 s CPU) passive. XLA's pool does not spin this way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ALL = dict(models="sd,asym-base,asym-x1.5,asym-x2", sizes="256,512", dtypes="float32,bfloat16", batches="1,4",
           ops="encode,decode,guided,train")
QUICK = dict(models="asym-x1.5", sizes="256", dtypes="float32", batches="1", ops="encode,guided")

# Dense peak FLOP/s by device kind and dtype (vendor figures; fp32 on GPUs without TF32).
PEAKS = {"TPU v4": {"bfloat16": 275e12}, "TPU v5 lite": {"bfloat16": 197e12}, "TPU v5e": {"bfloat16": 197e12},
         "TPU v5p": {"bfloat16": 459e12}, "TPU v6 lite": {"bfloat16": 918e12}, "TPU v6e": {"bfloat16": 918e12},
         "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12}, "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12}}


@functools.cache
def peak_flops(device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, what it assumes). Accelerators: the vendor's dense figure. CPU: measured, the best
    of a few 2048^3 matmuls, since a virtual CPU's turbo clock is unknown (its nominal clock x 32
    FLOP/cycle put MFU above 100%)."""
    for kind, peaks in PEAKS.items():
        if device.device_kind.startswith(kind):
            return peaks.get(dtype), f"{kind} {dtype} dense peak"
    if device.platform == "cpu":
        flops = _matmul_flops(dtype)
        return flops, f"measured: {dtype} 2048^3 matmul, {flops / 1e9:.0f} GFLOP/s"
    return None, "unknown"


def _matmul_flops(dtype: str, n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# -- models ------------------------------------------------------------------------------------

def models(name: str, family: str = "sd", seed: int = 0):
    """diffusers' model with random weights (torch's init) and ours holding the same weights.
    diffusers' asymmetric class always has quant convs: for a family without them (SD3, FLUX) they
    are set to the identity, as our export writes them."""
    import diffusers
    import torch

    from asymvq_jax.convert import build_model, diffusers_to_flax_params
    from asymvq_jax.models import family as family_fields
    from asymvq_jax.models import preset
    config = preset(name, **family_fields(family))
    torch.manual_seed(seed)
    cfg = config.to_diffusers_config()
    ref = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg).eval()  # ignores keys it does not take
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    if config.asymmetric and not config.use_quant_conv:
        from asymvq_jax.convert.writers import identity_quant_convs
        identity = identity_quant_convs(config)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in identity.items()}, strict=False)
        tensors = {k: v for k, v in tensors.items() if k not in identity}
    ours = build_model(config, diffusers_to_flax_params(tensors))
    return ref, ours


def inputs(batch: int, size: int, latent_channels: int = 4, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    mask[:, size // 4: 3 * size // 4, size // 8: size // 2] = 1.0
    z = rng.normal(size=(batch, size // 8, size // 8, latent_channels)).astype(np.float32)
    return x, mask, z


# -- one case ----------------------------------------------------------------------------------

def ours_fn(vae, op: str, x, mask, z):
    """(run(), compiled) for one op, compiled ahead of time so compile time, FLOPs and memory are its own."""
    import jax.numpy as jnp
    from flax import nnx

    from asymvq_jax import inference
    graphdef, state = nnx.split(vae)
    dtype = inference.compute_dtype(vae)
    x, mask, z = (jnp.asarray(a, dtype) for a in (x, mask, z))
    fn, args = {"encode": (inference._encode, (x,)), "decode": (inference._decode, (z, None, None)),
                "guided": (inference._decode, (z, x, mask))}[op]
    compiled = fn.lower(graphdef, state, *args).compile()
    return (lambda: compiled(state, *args).block_until_ready()), compiled


def torch_fn(ref, op: str, x, mask, z, dtype: str):
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if device != "cpu" or tdtype != torch.float32:
        ref = copy.deepcopy(ref).to(device, tdtype)
    x, mask, z = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(device, tdtype) for a in (x, mask, z))
    call = {"encode": lambda: ref.encode(x).latent_dist.mode(), "decode": lambda: ref.decode(z).sample,
            "guided": lambda: ref.decode(z, image=x, mask=mask).sample}[op]

    def run():
        with torch.no_grad():
            call()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def side_by_side(runs: dict, reps: int) -> dict[str, list[float]]:
    """Warm-up, then `reps` rounds in which every contender runs once, in turn. Records wall time,
    and this process's CPU time (`<name>_cpu`): on a shared machine the second shows the work done."""
    times = {key: [] for name in runs for key in (name, f"{name}_cpu")}
    for name, run in runs.items():
        run()
    for _ in range(reps):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - wall)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
    return times


def bench_case(ref, vae, op, size, dtype, batch, reps, device, with_diffusers) -> dict:
    from asymvq_jax import inference, load
    vae = load(vae, dtype=dtype)
    x, mask, z = inputs(batch, size, vae.config.latent_channels)
    start = time.perf_counter()
    ours, compiled = ours_fn(vae, op, x, mask, z)
    compile_s = time.perf_counter() - start
    runs = {"ours": ours}
    if with_diffusers:
        runs["diffusers"] = torch_fn(ref, op, x, mask, z, dtype)
    times = side_by_side(runs, reps)
    return row(op, size, dtype, batch, times, compile_s, compiled, device)


def row(op, size, dtype, batch, times, compile_s, compiled, device) -> dict:
    latency = statistics.median(times["ours"])
    flops = (compiled.cost_analysis() or {}).get("flops") if compiled is not None else None
    peak, _ = peak_flops(device, dtype)
    mem = compiled.memory_analysis() if compiled is not None else None
    out = {"op": op, "size": size, "dtype": dtype, "batch": batch, "ours_latency_s": latency,
           "ours_images_per_s": batch / latency, "compile_s": compile_s,
           "gflops": flops / 1e9 if flops else None,
           "mfu": flops / latency / peak if flops and peak else None,
           "ours_peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
           if mem is not None else None, "ours_times_s": times["ours"], "ours_cpu_s": times["ours_cpu"]}
    if "diffusers" in times:
        ref = statistics.median(times["diffusers"])
        cpu_ratio = statistics.median(times["diffusers_cpu"]) / statistics.median(times["ours_cpu"])
        out.update(diffusers_latency_s=ref, diffusers_images_per_s=batch / ref, speedup=ref / latency,
                   cpu_time_speedup=cpu_ratio, diffusers_times_s=times["diffusers"],
                   diffusers_cpu_s=times["diffusers_cpu"])
    return out


# -- the training step, ours and the authors' way -----------------------------------------------

def train_setup(model: str, size: int, batch: int, gan_group_size: int = 0, **overrides):
    """The default recipe's config for `model` at `size` px, the GAN on from step 0, and its train state
    (graphdefs, state, fixed, tx, disc_tx) with fresh weights (a random frozen encoder)."""
    from asymvq_jax.train.config import AUTHORS_IMAGENET_SUBSET, default_config, derived
    from asymvq_jax.train.state import build
    config = default_config()
    config.model.preset, config.image_size, config.batch_size = model, size, batch
    config.random_encoder, config.data.num_images = True, AUTHORS_IMAGENET_SUBSET
    config.loss.disc_start, config.loss.gan_group_size = 0, gan_group_size
    config.update(overrides)
    config = derived(config)
    return config, build(config)


def our_train_step(config, graphdefs, tx, disc_tx, state, fixed, batch_in):
    """(run(), compiled) for our jitted step; run() repeats step 0 on the same state."""
    import jax

    from asymvq_jax.train.step import make_train_step
    compiled = jax.jit(make_train_step(config, graphdefs, tx, disc_tx)).lower(state, fixed, batch_in).compile()
    return (lambda: jax.block_until_ready(compiled(state, fixed, batch_in))), compiled


def torch_models(config, graphdefs, state, fixed):
    """diffusers' AsymmetricAutoencoderKL, the lpips package's LPIPS-VGG and taming's PatchGAN (what the
    authors import), holding the weights of our train state. lpips and taming come with
    `scripts/setup.sh test` (installed --no-deps: their requirements pull a CUDA torch)."""
    import diffusers
    import lpips
    import numpy as np
    import torch
    from flax import nnx
    from taming.modules.discriminator.model import NLayerDiscriminator

    from asymvq_jax.convert import flax_params_to_diffusers, model_params
    from asymvq_jax.losses.lpips import load_weights
    from asymvq_jax.train.state import merge_vae
    ours = merge_vae(graphdefs["vae"], state["params"], fixed["frozen"])
    cfg = ours.config.to_diffusers_config()
    vae = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)
    vae.load_state_dict({k: torch.tensor(v) for k, v in flax_params_to_diffusers(model_params(ours)).items()})

    def tensor(a, hwio=False):
        a = np.asarray(a, np.float32)
        return torch.tensor(a.transpose(3, 2, 0, 1) if hwio else a)

    perceptual = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    weights = load_weights(config.loss.get("lpips_weights") or None)
    disc = NLayerDiscriminator(input_nc=3, ndf=config.disc.ndf, n_layers=config.disc.n_layers).train()
    d = nnx.merge(graphdefs["disc"], state["disc"]["params"], state["disc"]["stats"])
    with torch.no_grad():
        for name, p in perceptual.net.named_parameters():  # slice{s}.{i}.weight: i is torchvision's vgg16 index
            index, leaf = name.split(".")[1:]
            p.copy_(tensor(weights[f"trunk.{index}.kernel"], True) if leaf == "weight" else
                    tensor(weights[f"trunk.{index}.bias"]))
        for k, lin in enumerate(perceptual.lins):
            lin.model[1].weight.copy_(tensor(weights[f"lin{k}.kernel"], True))
        for conv, ref in zip(d.convs, [m for m in disc.main if isinstance(m, torch.nn.Conv2d)], strict=True):
            ref.weight.copy_(tensor(conv.kernel[...], True))
            if conv.bias is not None:
                ref.bias.copy_(tensor(conv.bias[...]))
        for norm, ref in zip(d.norms, [m for m in disc.main if isinstance(m, torch.nn.BatchNorm2d)], strict=True):
            for name, var in (("weight", norm.scale), ("bias", norm.bias), ("running_mean", norm.mean),
                              ("running_var", norm.var)):
                getattr(ref, name).copy_(tensor(var[...]))
    perceptual.requires_grad_(False)
    return vae, perceptual, disc


def authors_train_step(config, vae, perceptual, disc):
    """What the authors' Lightning loop does per batch (ldm/models/autoencoder*.py training_step with
    ldm/modules/losses/contperceptual.py, optimizers as their configure_optimizers builds them), in
    PyTorch: `step(x, mask, global_step, eps=None)` on NCHW tensors returns the logged terms.

    Optimizer 0: forward, the adaptive weight by two torch.autograd.grad calls at conv_out's weight,
    backward, Adam step. Optimizer 1: a second forward (a new posterior sample through the decoder
    just updated), the hinge loss, backward, Adam step. Lightning's toggle_optimizer leaves only the
    optimizer's own parameters requiring grad, so the second forward builds no graph; the loss's
    forward computes the NLL (LPIPS included) before it looks at optimizer_idx, so both passes run it.
    `eps`: the posterior's noise, for both forwards (a test's; else drawn each time)."""
    import torch
    from taming.modules.losses.vqperceptual import adopt_weight, hinge_d_loss
    loss = config.loss
    vae.requires_grad_(False)  # the encoder and the quant convs are frozen
    opt_ae = torch.optim.Adam(vae.decoder.parameters(), lr=config.lr, betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(0.5, 0.9))
    last_layer = vae.decoder.conv_out.weight

    def forward(x, mask, eps):
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * (torch.randn_like(post.mean) if eps is None else eps)
        x_rec = vae.decode(z, image=x, mask=mask).sample
        rec = torch.abs(x - x_rec) + loss.perceptual_weight * perceptual(x, x_rec)
        return x_rec, torch.sum(rec) / rec.shape[0], torch.sum(post.kl()) / x.shape[0]

    def generator(x, mask, factor, eps=None):  # optimizer 0
        vae.decoder.requires_grad_(True)
        disc.requires_grad_(False)
        x_rec, nll, kl = forward(x, mask, eps)
        g_loss = -torch.mean(disc(x_rec))
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4), 0.0, 1e4).detach()
        d_weight = d_weight * loss.disc_weight
        total = nll + loss.kl_weight * kl + d_weight * factor * g_loss
        opt_ae.zero_grad()
        total.backward()
        opt_ae.step()
        return {"loss": total, "nll": nll, "kl": kl, "g_loss": g_loss, "d_weight": d_weight}

    def discriminator(x, mask, factor, eps=None):  # optimizer 1
        vae.decoder.requires_grad_(False)
        disc.requires_grad_(True)
        x_rec, _, _ = forward(x, mask, eps)
        real, fake = disc(x.detach()), disc(x_rec.detach())
        d_loss = factor * hinge_d_loss(real, fake)
        opt_disc.zero_grad()
        d_loss.backward()
        opt_disc.step()
        return {"d_loss": d_loss, "logits_real": real.mean(), "logits_fake": fake.mean()}

    def step(x, mask, global_step, eps=None):
        factor = adopt_weight(loss.disc_factor, global_step, threshold=loss.disc_start)
        terms = {**generator(x, mask, factor, eps), **discriminator(x, mask, factor, eps)}
        return {k: v.detach() for k, v in terms.items()}

    step.generator, step.discriminator, step.forward = generator, discriminator, forward  # for the profile
    return step


def bench_train(model, size, batch, reps, device, with_torch, group_sizes=(0,), kernel_grads=("auto",)) -> list[dict]:
    """Our jitted training step (the default recipe, GAN on, fp32) beside the authors' PyTorch step
    holding the same weights on the same batch, alternating. One row per gan_group_size and kernel
    gradient formulation (models.conv.KERNEL_GRAD): each is compiled and timed in the same rounds
    (groups of 1 cost the per-group VJPs)."""
    from asymvq_jax.models import conv
    x, mask, _ = inputs(batch, size)
    batch_in = {"image": x, "mask": mask}
    runs, compiled, compile_s = {}, {}, {}
    cases = [(group, mode) for group in group_sizes for mode in kernel_grads]
    for group, mode in cases:
        config, (graphdefs, state, fixed, tx, disc_tx) = train_setup(model, size, batch, group)
        start = time.perf_counter()
        with conv.kernel_grads(mode):
            runs[f"ours{group}{mode}"], compiled[group, mode] = our_train_step(config, graphdefs, tx, disc_tx, state,
                                                                                fixed, batch_in)
        compile_s[group, mode] = time.perf_counter() - start
    if with_torch:
        import torch
        modules = torch_models(config, graphdefs, state, fixed)
        step = authors_train_step(config, *modules)
        tx_, tmask = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, mask))
        runs["diffusers"] = lambda: step(tx_, tmask, int(state["step"]))
    times = side_by_side(runs, reps)
    rows = []
    for group, mode in cases:
        mine = {"ours": times[f"ours{group}{mode}"], "ours_cpu": times[f"ours{group}{mode}_cpu"]}
        theirs = {k: times[k] for k in ("diffusers", "diffusers_cpu") if k in times}
        r = row("train", size, "float32", batch, {**mine, **theirs}, compile_s[group, mode], compiled[group, mode],
                device)
        rows.append({**r, "gan_group_size": group, "kernel_grad": mode})
    return rows


# -- report ------------------------------------------------------------------------------------

def table(rows) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    head = (f"{'model':15} {'op':7} {'px':>4} {'dtype':8} {'B':>2} | {'img/s':>7} {'lat s':>7} {'compile':>7} "
            f"{'GFLOP':>7} {'MFU':>6} {'MiB':>6} | {'diff img/s':>10} {'speedup':>7} {'CPU-time':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:15} {r['op']:7} {r['size']:4d} {r['dtype']:8} {r['batch']:2d} | "
                     f"{r['ours_images_per_s']:7.3f} {r['ours_latency_s']:7.3f} {r['compile_s']:7.1f} "
                     f"{fmt(r['gflops'], '7.0f')} {fmt(r['mfu'] and 100 * r['mfu'], '5.1f')}% "
                     f"{fmt(r['ours_peak_mib'], '6.0f')} | {fmt(r.get('diffusers_images_per_s'), '10.3f')} "
                     f"{fmt(r.get('speedup'), '6.2f')}x {fmt(r.get('cpu_time_speedup'), '7.2f')}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"defaults {QUICK} instead of {ALL}")
    for flag in ALL:
        parser.add_argument(f"--{flag}", default=None, help="comma-separated")
    parser.add_argument("--family", default="sd", choices=("sd", "sdxl", "sd3", "flux"),
                        help="the latent family of every model (channels, quant convs)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 3, quick 2)")
    parser.add_argument("--no-diffusers", action="store_true", help="ours only")
    parser.add_argument("--gan-group-sizes", default="0", help="train: our step with each loss.gan_group_size "
                        "(comma-separated; 0 = one group), timed in the same rounds")
    parser.add_argument("--kernel-grads", default="auto", help="train: our step with each kernel-gradient "
                        "formulation (models.conv.KERNEL_GRAD: auto, dots, xla; comma-separated), timed in the "
                        "same rounds")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    choice = {k: (getattr(args, k) or (QUICK if args.quick else ALL)[k]).split(",") for k in ALL}
    reps = args.reps or (2 if args.quick else 3)

    import jax
    import torch
    device = jax.devices()[0]
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    result = {"device": f"{device.platform} {device.device_kind}",
              "machine": platform.processor() or platform.machine(),
              "threads": len(os.sched_getaffinity(0)), "jax": jax.__version__, "torch": torch.__version__,
              "peak_assumed": {d: peak_flops(device, d)[1] for d in choice["dtypes"]},
              "peak_flops": {d: peak_flops(device, d)[0] for d in choice["dtypes"]},
              "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "load_before": os.getloadavg(), "rows": []}
    for name in choice["models"] if set(choice["ops"]) - {"train"} else ():
        ref, vae = models(name, args.family)
        for op in choice["ops"]:
            if op == "train" or (op == "guided" and not vae.config.asymmetric):
                continue
            for size in map(int, choice["sizes"]):
                for dtype in choice["dtypes"]:
                    for batch in map(int, choice["batches"]):
                        r = bench_case(ref, vae, op, size, dtype, batch, reps, device, not args.no_diffusers)
                        result["rows"].append({"model": name if args.family == "sd" else f"{name}/{args.family}",
                                               **r})
                        print(table(result["rows"][-1:]).splitlines()[-1], flush=True)
    if "train" in choice["ops"]:
        groups = tuple(map(int, args.gan_group_sizes.split(",")))
        kernel_grads = tuple(args.kernel_grads.split(","))
        for name in choice["models"]:
            for size in map(int, choice["sizes"]):
                for batch in map(int, choice["batches"]):
                    for r in bench_train(name, size, batch, reps, device, not args.no_diffusers, groups, kernel_grads):
                        label = name if r["gan_group_size"] == 0 else f"{name} g{r['gan_group_size']}"
                        label += "" if len(kernel_grads) == 1 else f" {r['kernel_grad']}"
                        result["rows"].append({"model": label, "load": os.getloadavg(), **r})
                        print(table(result["rows"][-1:]).splitlines()[-1], flush=True)
    result["load_after"] = os.getloadavg()
    print(table(result["rows"]))
    print(f"device {result['device']}; peak assumed {result['peak_assumed']}; "
          f"load average {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
