"""Train: python train.py --config configs/local.py [--workdir DIR] [--config.x=y]."""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from asymvq_jax.train.stages import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/local.py", "A configs/*.py file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples; default config.workdir, else runs/<config name>.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or _CONFIG.value.get("workdir") or f"runs/{pathlib.Path(config_path).stem}"
    run(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
