"""Train: python train.py --config configs/local.py [--workdir DIR] [--config.x=y]."""

import pathlib
import re
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/local.py", "A configs/*.py file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples; default config.workdir, else runs/<config name>.")


def main(argv):
    del argv
    # After the flags: a config mistake is reported without importing jax.
    from asymvq_jax.checkpoint import WorkdirBusyError
    from asymvq_jax.train.stages import run
    logging.set_verbosity(logging.INFO)
    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or _CONFIG.value.get("workdir") or f"runs/{pathlib.Path(config_path).stem}"
    try:
        run(_CONFIG.value, workdir)
    except (ValueError, FileNotFoundError, WorkdirBusyError) as e:  # bad input, named: no traceback
        logging.debug("traceback", exc_info=True)
        sys.exit(f"error: {e}")


def parse_flags(argv):
    """absl's parsing, with a config's own error (or a missed override) as one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError) as e:
        text = str(e.args[0] if e.args else e).strip()
        # config_flags puts the config's traceback into its message: its last line is the error
        message = text.splitlines()[-1].strip("'\"") if text else type(e).__name__
        message = re.sub(r"^\w+(Error|Exception): ", "", message)
        hint = stage_hint(argv) if isinstance(e, KeyError) else ""
        sys.exit(f"error: {message}" + (f" is not a field: {hint}" if hint else ""))


def stage_hint(argv) -> str:
    """For a config that runs stages, where an override that names no field should go."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/local.py")
    file, _, arg = path.partition(":")
    try:
        config = runpy.run_path(file)["get_config"](arg or None)
    except Exception:  # noqa: BLE001 - the config's own error is the message already
        return ""
    if "stages" not in config:
        return ""
    missed = [a.split("=", 1)[0][len("--config."):] for a in argv
              if a.startswith("--config.") and a.split("=", 1)[0][len("--config."):].split(".")[0] not in config]
    if not missed:
        return ""
    return (f"{file} runs stages {list(config.stages)}, each with its own fields: give "
            + " or ".join(f"--config.{stage}.{missed[0]}" for stage in config.stages))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
