"""Evaluate decoders on a dataset and a fixed mask set: every metric, plain and mask-guided, side by side.

    python eval.py --decoder runs/x1_5 --decoder path/to/sd-vae --data tfds:imagenet2012/validation \
        --masks thick_256 --image_size 256 --out runs/eval

Writes OUT/results.json, OUT/results.md and OUT/<decoder>_{worst,best}.png. OUT must be new or
an earlier eval's output (--force: write into anything else, replacing only those files); it can
never be a decoder, the data or the masks, lie inside one or hold one.
"""

import argparse
import logging
import sys

from asymvq_jax import evaluation, inception, paths
from asymvq_jax.data.evalset import MASK_SETS, load_masks
from asymvq_jax.losses.lpips import LPIPS, default_weights_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", action="append", required=True,
                   help="anything asymvq_jax.load reads: a checkpoint, a training workdir or a run of stages; "
                        "repeat to compare (an SD VAE is the plain baseline). Every path may be gs://")
    p.add_argument("--data", default="bundled_photos",
                   help="folder:PATH (or a folder), tfds:NAME/SPLIT[@DATA_DIR], or bundled_photos")
    p.add_argument("--masks", default="", help="a shipped mask set (thin|medium|thick_256|512) or a folder of "
                                               "masks (white = hole); default thick_<image_size>, "
                                               "or thick_256 drawn at image_size for other sizes")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8, help="global; divisible by the number of devices")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0 = all)")
    p.add_argument("--latents", default="", help="a folder of latents made elsewhere (NAME.npy/.safetensors per "
                                                 "image, scaled as for the diffusion model) to decode")
    p.add_argument("--lpips", default=default_weights_path(), help="LPIPS weight file ('' = no LPIPS)")
    p.add_argument("--fid_inception", default=inception.default_weights_path(),
                   help="FID Inception weight file ('' = no FID); built by " + inception.BUILD_COMMAND)
    p.add_argument("--fid_stats", default="", help="reference statistics (.npz, pytorch-fid's format); "
                                                   "default: those of the evaluated images")
    p.add_argument("--save_fid_stats", default="", help="write the evaluated images' statistics here (.npz)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of workdir decoders (default latest)")
    p.add_argument("--allow_pickle", action="store_true", help="read .ckpt/.bin checkpoints (pickles)")
    p.add_argument("--family", default=None, choices=("sd", "sdxl", "sd3", "flux"),
                   help="the latent family of decoder files without a config (e.g. FLUX's ae.safetensors)")
    p.add_argument("--grids", type=int, default=8, help="worst and best examples shown per decoder")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--force", action="store_true", help="write into an existing OUT that is not an earlier eval's "
                                                        "output (only the files eval writes are replaced)")
    return p.parse_args(argv)


def optional(path: str, what: str, load):
    if not path:
        return None
    if not paths.isfile(path):
        logging.warning("no %s: %s does not exist", what, path)
        return None
    return load(path)


def default_masks(image_size: int) -> str:
    """thick_<size> where LaMa made that set; otherwise thick_256, drawn again at `image_size`."""
    return f"thick_{image_size}" if f"thick_{image_size}" in MASK_SETS else "thick_256"


def check_out(args) -> None:
    data = args.data[len("folder:"):] if args.data.startswith("folder:") else args.data
    inputs = [*args.decoder, args.latents, args.masks if args.masks not in MASK_SETS else ""]
    if not data.startswith("tfds:") and data != "bundled_photos":
        inputs.append(data)
    paths.check_destination(args.out, sources=inputs, force=args.force, what="an earlier eval's output",
                            ours=lambda p: paths.holds_only(p, evaluation.OUTPUT_FILES, "results.json"))


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    check_out(args)
    decoders = [evaluation.load_candidate(p, step=args.step, allow_pickle=args.allow_pickle, family=args.family)
                for p in args.decoder]
    images = evaluation.dataset_images(args.data, args.limit)
    masks = load_masks(default_masks(args.image_size) if not args.masks else args.masks, args.image_size)
    results = evaluation.evaluate(
        decoders, images, masks, image_size=args.image_size, batch_size=args.batch_size,
        lpips=optional(args.lpips, "LPIPS", LPIPS), inception=optional(args.fid_inception, "FID", inception.load),
        latents=args.latents, fid_stats=args.fid_stats, save_fid_stats=args.save_fid_stats, grids=args.grids,
        progress=True)
    evaluation.write_outputs(results, args.out)
    print(evaluation.markdown_table(results))
    print(f"{results['num_images']} images, {results['images_per_s']:.2f} images/s")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input, named: no traceback
        sys.exit(f"error: {e}")
