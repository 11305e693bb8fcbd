"""Two-way weight conversion between diffusers, original LDM / Asymmetric_VQGAN and our Flax model.

    vae = from_pretrained("path/to/diffusers_folder_or_file")
    save_pretrained(vae, "out_dir", format="diffusers")   # or "ldm" (file), "asymvq" (ours)

The key rule lives in `keys`, file reading in `readers`, the formats in `writers` (documented
there), the model glue in `api`.
"""

from .api import (abstract_model, build_model, diffusers_to_flax_params, flax_params_to_diffusers,
                  from_pretrained, model_params, save_pretrained)
from .errors import (ConvertError, CorruptFileError, KeyMismatchError, PickleNotAllowedError,
                     ShapeMismatchError, UnknownFormatError)
from .readers import Checkpoint, detect_layout, infer_config, match_preset, read_checkpoint
from .writers import FORMATS

__all__ = [
    "abstract_model", "build_model", "diffusers_to_flax_params", "flax_params_to_diffusers",
    "from_pretrained", "model_params", "save_pretrained",
    "ConvertError", "CorruptFileError", "KeyMismatchError", "PickleNotAllowedError",
    "ShapeMismatchError", "UnknownFormatError",
    "Checkpoint", "detect_layout", "infer_config", "match_preset", "read_checkpoint", "FORMATS",
]
