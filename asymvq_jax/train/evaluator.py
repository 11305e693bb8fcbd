"""Evaluation during and after training: `evaluation`'s measure on the config's eval split and on
the held-out photos."""

import jax
from flax import nnx

from asymvq_jax import evaluation
from asymvq_jax.data import held_out_batch
from asymvq_jax.data.evalset import load_masks
from asymvq_jax.losses import LPIPS
from asymvq_jax.metrics import summarize
from asymvq_jax.train.state import model_config


def eval_images(config):
    """The fixed eval split of a training config: TFDS `config.eval.split`, else the images of
    `config.eval.path`, else those of the training folder (then not held out)."""
    data, e = config.data, config.eval
    if data.source == "tfds":
        spec = f"tfds:{data.name}/{e.split}" + (f"@{data.data_dir}" if data.data_dir else "")
    elif e.path:
        spec = e.path
    else:
        spec = data.path if data.source == "folder" else data.source
    return evaluation.dataset_images(spec, e.num_images)


def make_evaluator(config, graphdefs):
    """`run(decoder_params, fixed) -> {"eval/<mode>/<metric>": value}` on the config's eval split;
    the images and masks are read once."""
    images = eval_images(config)
    masks = load_masks(config.eval.masks, config.image_size, len(images))
    model = model_config(config)

    def run(params, fixed) -> dict[str, float]:
        candidate = evaluation.Candidate("train", graphdefs["vae"], (params, fixed["frozen"]), model)
        lpips = nnx.merge(graphdefs["lpips"], fixed["lpips"])
        results = evaluation.evaluate([candidate], images, masks, image_size=config.image_size,
                                      batch_size=config.eval.batch_size or config.batch_size, lpips=lpips)
        return evaluation.scalars(results)

    return run


def held_out_report(config, vae, examples: int) -> dict[str, dict[str, float]]:
    """{decode: region report} of `vae` on `examples` held-out examples: the plain decode, and for an
    asymmetric decoder the mask-guided one (eval.py's jitted measure, on one batch)."""
    lpips_graphdef, lpips_state = nnx.split(LPIPS(config.loss.get("lpips_weights") or None))
    graphdef, state = nnx.split(vae)
    measure = evaluation.make_measure(graphdef, vae.config.asymmetric, lpips_graphdef)
    _, values, _ = measure((state,), lpips_state, None, held_out_batch(config, examples), None)
    return {mode: summarize(jax.device_get(values[mode])) for mode in evaluation.MODES if mode in values}
