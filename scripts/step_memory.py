"""Per-device memory of one train step, as XLA plans it (compile only, nothing allocated).

    python scripts/step_memory.py --variant x1.5 --size 256 --remat full --fsdp 4

Runs on CPU with simulated devices (set before jax starts); prints one JSON line with
`compiled.memory_analysis()` in MiB and the compile time. The numbers are per device, for the
per-device batch given, with tpu_v4's dtypes (bfloat16 compute, float32 parameters and Adam).
"""

import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="x1.5", help="base | x1.5 | x2")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--remat", default="full", help="'' (off), full, or a jax.checkpoint_policies name")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--devices", type=int, default=4, help="simulated devices (data = devices / fsdp)")
    p.add_argument("--batch-per-device", type=int, default=8)
    p.add_argument("--fast-compile", action="store_true",
                   help="skip LLVM's optimisations: the memory plan is made before them and stays the "
                        "same, the compile takes a fraction of the time (and says nothing of a real one)")
    args = p.parse_args(argv)
    fast = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" if args.fast_compile else ""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}" + fast)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax

    from asymvq_jax import parallel
    from asymvq_jax.train.loop import jit_step
    from asymvq_jax.train.state import build
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import tpu_v4

    config = tpu_v4.get_config(f"variant={args.variant},fsdp={args.fsdp},batch={args.batch_per_device * args.devices}")
    config.image_size, config.remat = args.size, args.remat
    mesh = parallel.make_mesh(config.mesh)
    graphdefs, state, fixed, tx, disc_tx = build(config, mesh, abstract=True)
    start = time.perf_counter()
    compiled = jit_step(config, mesh, graphdefs, tx, disc_tx, state, fixed).lower(
        state, fixed, parallel.batch_spec(config, mesh)).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    print(json.dumps({"variant": args.variant, "size": args.size, "remat": args.remat or "off", "fsdp": args.fsdp,
                      "mesh": dict(mesh.shape), "batch_per_device": args.batch_per_device,
                      "arguments_mib": mib(m.argument_size_in_bytes), "outputs_mib": mib(m.output_size_in_bytes),
                      "aliased_mib": mib(m.alias_size_in_bytes), "temp_mib": mib(m.temp_size_in_bytes),
                      "peak_mib": mib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                      + m.temp_size_in_bytes),
                      "compile_s": round(seconds, 1), "fast_compile": args.fast_compile, "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
