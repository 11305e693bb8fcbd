"""A run is one config, or stages run in order (`config.stages` names them), each in its own
workdir under the run's. A stage whose `init_from` names an earlier stage starts from that
stage's workdir; a finished stage is skipped, so a restarted run resumes where it stopped.
Runs on the bundled photos end with a table of the held-out photos' errors.
"""

import logging
import os

import jax
import numpy as np

from asymvq_jax import checkpoint
from asymvq_jax.data import held_out_batch
from asymvq_jax.train.config import derived
from asymvq_jax.train.loop import train

TABLE_EXAMPLES = 12  # 4 crops of each held-out photo, each with its own mask


def run(config, workdir: str) -> None:
    stages = list(config.stages) if "stages" in config else [None]
    if stages != [None] and jax.process_index() == 0:
        checkpoint.write_stages(workdir, stages)  # so that loading the run's folder finds its last stage
    for name in stages:
        stage, stage_dir = (config, workdir) if name is None else resolve(config, name, workdir)
        stage = derived(stage)  # total_steps may come from the data
        if finished(stage_dir, stage.total_steps):
            logging.info("stage %s is done (%s); skipping it", name, stage_dir)
        else:
            logging.info("training %s in %s", name or "", stage_dir)
            train(stage, stage_dir)
            if not finished(stage_dir, stage.total_steps):
                return  # preempted: the checkpoint is saved, and a restart resumes this stage
        if stage.data.source == "bundled_photos" and jax.process_index() == 0:
            print(f"\n{name or 'run'}: held-out photos at step {stage.total_steps}\n"
                  + held_out_table(stage, stage_dir)
                  + f"\ngrid: {os.path.join(stage_dir, 'samples', f'step_{stage.total_steps:07d}.png')}\n",
                  flush=True)


def resolve(config, name: str, workdir: str):
    """The stage's config (init_from naming an earlier stage becomes its workdir) and workdir."""
    stage = config[name].copy_and_resolve_references()
    earlier = list(config.stages)[:list(config.stages).index(name)]
    if stage.get("init_from") in earlier:
        stage.init_from = os.path.join(workdir, stage.init_from)
    return stage, os.path.join(workdir, name)


def finished(workdir: str, total_steps: int) -> bool:
    if not checkpoint.is_workdir(workdir):
        return False
    mgr = checkpoint.manager(workdir)
    try:
        return (mgr.latest_step() or 0) >= total_steps
    finally:
        mgr.close()


def evaluate(config, vae) -> dict[str, dict[str, float]]:
    """{decode: region report} of `vae` on the held-out examples: the plain decode, and for an
    asymmetric decoder the mask-guided one (eval.py's jitted measure, on one batch)."""
    from flax import nnx

    from asymvq_jax.evaluate import MODES, make_measure
    from asymvq_jax.losses import LPIPS
    from asymvq_jax.metrics import summarize
    lpips_graphdef, lpips_state = nnx.split(LPIPS(config.loss.get("lpips_weights") or None))
    graphdef, state = nnx.split(vae)
    measure = make_measure(graphdef, vae.config.asymmetric, lpips_graphdef)
    _, values, _ = measure((state,), lpips_state, None, held_out_batch(config, TABLE_EXAMPLES), None)
    return {mode: summarize(jax.device_get(values[mode])) for mode in MODES if mode in values}


def held_out_table(config, workdir: str) -> str:
    """A Markdown table of the workdir's latest model: PSNR / SSIM / LPIPS per decode and region."""
    lines = ["| decode | region | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|"]
    for name, report in evaluate(config, checkpoint.load(workdir)).items():
        for region in ("whole", "hole", "known"):
            cells = [report.get(f"{metric}/{region}", np.nan) for metric in ("psnr", "ssim", "lpips")]
            lines.append(f"| {name} | {region} | " + " | ".join(
                "" if np.isnan(v) else f"{v:.{p}f}" for v, p in zip(cells, (2, 3, 3))) + " |")
    return "\n".join(lines)
