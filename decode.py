#!/usr/bin/env python
"""Decode with an (asymmetric) SD autoencoder.

  python decode.py reconstruct --model SRC --image photo.png --mask mask.png --out side_by_side.png
  python decode.py decode --model SRC --latents z.npy --scaled --image photo.png --mask mask.png --out out.png

SRC: anything `from_pretrained` reads (diffusers folder, LDM / SD / Asymmetric_VQGAN file, ours)
or a train.py workdir. Masks are black (keep) and white (the hole). Images of any size are padded
to a multiple of 8 and cropped back. `reconstruct` writes input | masked input | plain decode |
mask-guided decode; `decode` writes one PNG per latent (out.png, or out_0.png, out_1.png, ...).
An output never replaces an input, and replaces an existing file only if it is an image (--force:
any file).
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="checkpoint file or folder, or a training workdir")
    common.add_argument("--image", required=True, help="the original image (PNG, JPEG, ...)")
    common.add_argument("--mask", required=True, help="binary mask of the same size, white = hole")
    common.add_argument("--out", required=True, help="output PNG")
    common.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    common.add_argument("--tile", type=int, default=None,
                        help="decode in overlapping latent tiles of this size (e.g. 64 = 512 px) for large images")
    common.add_argument("--step", type=int, default=None, help="workdir model: the checkpoint step (default latest)")
    common.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles you trust")
    common.add_argument("--force", action="store_true", help="replace an existing --out file that is not an image")
    sub.add_parser("reconstruct", parents=[common], help="image + mask -> encode -> plain and guided decodes")
    dec = sub.add_parser("decode", parents=[common], help="latents from an inpainting sampler -> PNG")
    dec.add_argument("--latents", required=True, help=".npy or .safetensors, [B, C, h, w] (torch) or [B, h, w, C], "
                     "or FLUX's packed [B, (h/2)(w/2), 4C] (unpacked from the image size)")
    dec.add_argument("--key", default=None, help=".safetensors: the tensor's name (default: its only tensor)")
    space = dec.add_mutually_exclusive_group(required=True)
    space.add_argument("--scaled", action="store_true", help="latents as the diffusion model sees them, "
                       "(z - shift_factor) * scaling_factor (a pipeline's output_type='latent'): unscaled here")
    space.add_argument("--unscaled", action="store_true", help="latents as the encoder returns them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from asymvq_jax import inference  # after the arguments: --help and their errors need no jax
    try:
        model = dict(dtype=args.dtype, step=args.step, allow_pickle=args.allow_pickle, force=args.force)
        files = dict(image_path=args.image, mask_path=args.mask, out=args.out, tile=args.tile, progress=True)
        if args.command == "reconstruct":
            written = inference.reconstruct_file(args.model, **files, **model)
        else:
            written = inference.decode_file(args.model, args.latents, scaled=args.scaled, key=args.key, **files,
                                            **model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        logging.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
