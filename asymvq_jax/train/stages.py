"""A run is one config, or stages run in order (`config.stages` names them), each in its own
workdir under the run's. A stage whose `init_from` names an earlier stage starts from that
stage's workdir; a finished stage is skipped, so a restarted run resumes where it stopped.
Runs on the bundled photos end with a table of the held-out photos' errors.
"""

import logging

import jax
import numpy as np

from asymvq_jax import checkpoint, paths
from asymvq_jax.train.config import derived
from asymvq_jax.train.evaluator import held_out_report
from asymvq_jax.train.loop import sample_path, train

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
                  + f"\ngrid: {sample_path(stage_dir, stage.total_steps)}\n",
                  flush=True)


def resolve(config, name: str, workdir: str):
    """The stage's config (init_from naming an earlier stage becomes its workdir) and workdir."""
    stage = config[name].copy_and_resolve_references()
    earlier = list(config.stages)[:list(config.stages).index(name)]
    if stage.get("init_from") in earlier:
        stage.init_from = paths.join(workdir, stage.init_from)
    return stage, paths.join(workdir, name)


def finished(workdir: str, total_steps: int) -> bool:
    if not checkpoint.is_workdir(workdir):
        return False
    mgr = checkpoint.manager(workdir)
    try:
        return (mgr.latest_step() or 0) >= total_steps
    finally:
        mgr.close()


def held_out_table(config, workdir: str) -> str:
    """A Markdown table of the workdir's latest model: PSNR / SSIM / LPIPS per decode and region."""
    lines = ["| decode | region | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|"]
    for name, report in held_out_report(config, checkpoint.load(workdir), TABLE_EXAMPLES).items():
        for region in ("whole", "hole", "known"):
            cells = [report.get(f"{metric}/{region}", np.nan) for metric in ("psnr", "ssim", "lpips")]
            lines.append(f"| {name} | {region} | " + " | ".join(
                "" if np.isnan(v) else f"{v:.{p}f}" for v, p in zip(cells, (2, 3, 3))) + " |")
    return "\n".join(lines)
