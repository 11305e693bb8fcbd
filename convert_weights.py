#!/usr/bin/env python
"""Convert autoencoder weights between diffusers, original LDM / Asymmetric_VQGAN and asymvq.

  python convert_weights.py import SRC DST [--allow-pickle] [--family sd|sdxl|sd3|flux]
  python convert_weights.py export SRC DST --format diffusers|ldm|asymvq [--allow-pickle] [--fp16]
  python convert_weights.py export WORKDIR DST --format diffusers [--step N] [--raw]

DST must be new or a previous export of the same format (--force: write into anything else,
replacing only the files the export writes); it can never be SRC, inside it or hold it.
SRC and DST may be local or gs://.
"""

import argparse
import logging
import sys

FORMATS_HELP = """\
formats read (SRC, detected from files, keys and shapes):
  diffusers   folder with config.json + diffusion_pytorch_model.safetensors (or .bin), for
              AutoencoderKL or AsymmetricAutoencoderKL; a pipeline folder with vae/ works too
  ldm         one .safetensors/.ckpt/.bin in the original CompVis layout (encoder.down.N.block.M,
              mid.attn_1.q, ...); whole SD/SDXL/SD3 checkpoints (first_stage_model.*) keep only
              the VAE; FLUX's ae.safetensors (BFL: the same names, no quant convs) too
  asymmetric  an Asymmetric_VQGAN (Lightning) checkpoint: state_dict with decoder.encoder.layers.N;
              the unused decoder.up_layers.* and loss.* are dropped (and reported)
  asymvq      ours: folder with asymvq_config.json + params.safetensors (Flax paths, Flax layout),
              or that .safetensors alone (config in its metadata)
  workdir     a train.py workdir: its latest checkpoint (or --step N), EMA weights when the run
              kept them (or --raw for the trained weights themselves); a run of stages (runs/local)
              gives its last stage, a stage's folder (runs/local/autoencoder) that stage

formats written (DST):
  asymvq      (import) the folder above; DST ending in .safetensors writes the single file
  diffusers   folder: config.json (with _diffusers_version) + diffusion_pytorch_model.safetensors;
              loads with diffusers' AsymmetricAutoencoderKL/AutoencoderKL.from_pretrained
  ldm         one .safetensors in the original layout; the asymmetric branch is named
              decoder.encoder.layers.N as in Asymmetric_VQGAN

families (--family): a single file has no config, so its latent factors come from its family:
  sd 0.18215 | sdxl 0.13025 | sd3 1.5305, shift 0.0609 | flux 0.3611, shift 0.1159. A whole
  checkpoint says its family by its other models' keys; otherwise a 4-channel file is sd unless
  --family sdxl, and a 16-channel one (no quant convs) needs --family sd3 or flux.

.ckpt/.bin/.pt files are pickles, which can run code when loaded: they are refused unless
--allow-pickle is given, and then read with torch.load(weights_only=True).
Outputs are written to a temporary path and moved into place only when complete.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=FORMATS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", metavar="SRC", help="checkpoint file or folder (any format read)")
    common.add_argument("dst", metavar="DST", help="output folder or file")
    common.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt/.bin pickles (only for files you trust)")
    common.add_argument("--fp16", action="store_true", help="write float16 weights")
    common.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default=None,
                        help="the latent family of a single file without a config (see below)")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("--step", type=int, default=None, help="workdir SRC: the checkpoint step (default latest)")
    common.add_argument("--raw", action="store_true", help="workdir SRC: the raw weights even if EMA was kept")
    common.add_argument("--force", action="store_true",
                        help="write into an existing DST that is not a previous export of this format "
                             "(only the files the export writes are replaced)")
    sub.add_parser("import", parents=[common], help="any checkpoint -> asymvq (ours)",
                   epilog=FORMATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp = sub.add_parser("export", parents=[common], help="any checkpoint -> diffusers / ldm / asymvq",
                         epilog=FORMATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("--format", required=True, choices=("diffusers", "ldm", "asymvq"), help="output format")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("jax", "absl"):  # absl: orbax's step-by-step restore messages
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # After the arguments: --help and their errors need no jax.
    from asymvq_jax import load, save_pretrained
    from asymvq_jax.convert import writers

    fmt = "asymvq" if args.command == "import" else args.format
    try:
        writers.check_destination(args.dst, fmt, sources=[args.src], force=args.force)  # before the slow part
        vae = load(args.src, step=args.step, ema=not args.raw, allow_pickle=args.allow_pickle, family=args.family)
        out = save_pretrained(vae, args.dst, format=fmt, dtype="float16" if args.fp16 else None,
                              force=args.force)
    except (ValueError, FileNotFoundError) as e:  # the converter raises ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info("wrote %s (%s, family %s)", out, fmt, vae.config.family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
