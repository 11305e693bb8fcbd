"""Write diffusers-layout tensors in each export format; nothing is ever half-written.

Formats:

* `diffusers`: a folder with `config.json` (diffusers' config, with `_class_name`
  `AutoencoderKL` or `AsymmetricAutoencoderKL` and `_diffusers_version`) and
  `diffusion_pytorch_model.safetensors` (metadata `{"format": "pt"}`). Loads with
  `AsymmetricAutoencoderKL.from_pretrained(dir)` / `AutoencoderKL.from_pretrained(dir)`.
  `AsymmetricAutoencoderKL` always has quant convs: a family without them (SD3, FLUX) gets
  exact identity 1x1 convs, and its config.json keeps `use_quant_conv: false` and
  `shift_factor`, which that class ignores but our import reads (and drops the identities).
* `ldm`: one `.safetensors` file in the original CompVis/LDM layout (`encoder.down.N.block.M`,
  `mid.attn_1.q` as 1x1 convs, decoder `up.N` numbered from high resolution); the
  asymmetric branch uses Asymmetric_VQGAN's name `decoder.encoder.layers.N`. Metadata:
  `{"format": "pt", "asymvq_config": <our config JSON>}` so that a re-import restores
  norm groups and scaling factor exactly.
* `asymvq` (ours): a folder with `asymvq_config.json`
  (`{"format": "asymvq", "format_version": 1, "config": {VAEConfig fields}}`) and
  `params.safetensors` holding the Flax parameters in Flax layout (HWIO conv kernels,
  (in, out) linear kernels, GroupNorm `scale`), each under its NNX path joined with "."
  (`decoder.up_blocks.0.resnets.1.conv1.kernel`); its metadata repeats the config
  (`format: asymvq`, `asymvq_config`). Giving a path ending in `.safetensors` writes that
  single file alone, which also loads (config from the metadata).

Every writer builds its output in a temporary place that becomes the destination only when
complete (`paths.atomic_output`, which also says how that is done on `gs://`). A destination
that exists must be a previous export of the same format (`check_destination`), unless forced;
a forced export replaces only the files it writes there.
"""

import importlib.metadata
import json
import os

import numpy as np
import safetensors.numpy

from asymvq_jax.models.config import VAEConfig
from asymvq_jax import paths
from asymvq_jax.paths import atomic_output

from . import keys as K
from .readers import ASYMVQ_CONFIG, ASYMVQ_FORMAT_VERSION, ASYMVQ_WEIGHTS

FORMATS = ("diffusers", "ldm", "asymvq")
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_FALLBACK_DIFFUSERS_VERSION = "0.39.0"


def check_destination(dst: str, format: str, *, sources=(), force: bool = False) -> None:
    """Refuses `dst` if it overlaps a source, or exists and is not a previous `format` export
    (unless `force`): raises `paths.DestinationError` before anything is written."""
    single = dst.lower().endswith(".safetensors")
    if format == "diffusers":
        ours, what = lambda p: paths.holds_only(p, ("config.json", "diffusion_pytorch_model*"), "config.json"), \
            "a diffusers export (config.json and diffusion_pytorch_model.safetensors only)"
    elif format == "asymvq" and not single:
        ours, what = lambda p: paths.holds_only(p, (ASYMVQ_CONFIG, ASYMVQ_WEIGHTS), ASYMVQ_CONFIG), \
            f"an asymvq export ({ASYMVQ_CONFIG} and {ASYMVQ_WEIGHTS} only)"
    else:
        kind = "asymvq" if format == "asymvq" else "ldm"
        ours, what = lambda p: _exported_file_kind(p) == kind, f"a .safetensors file this converter exported ({format})"
    paths.check_destination(dst, sources=sources, ours=ours, what=what, force=force)


def _exported_file_kind(path: str) -> str | None:
    """"asymvq" or "ldm" for a .safetensors file we wrote (by its metadata), else None."""
    try:
        with paths.path(path).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 24:
                return None
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError):
        return None
    if "asymvq_config" not in metadata:
        return None
    return "asymvq" if metadata.get("format") == "asymvq" else "ldm"


def _save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return _FALLBACK_DIFFUSERS_VERSION


def diffusers_to_ldm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n_up = K.num_up_blocks_of_diffusers(tensors)
    out = {}
    for k, v in tensors.items():
        new = K.diffusers_to_ldm_key(k, n_up)
        if new is None:
            raise ValueError(f"{k}: no LDM name for this diffusers key")
        out[new] = K.diffusers_to_ldm_array(k, v)
    return out


def identity_quant_convs(cfg: VAEConfig) -> dict[str, np.ndarray]:
    """Exact identity 1x1 convs for the quant convs a family lacks (torch layout)."""
    out = {}
    for name, flag, channels in (("quant_conv", cfg.use_quant_conv, 2 * cfg.latent_channels),
                                 ("post_quant_conv", cfg.use_post_quant_conv, cfg.latent_channels)):
        if not flag:
            out[f"{name}.weight"] = np.eye(channels, dtype=np.float32)[:, :, None, None]
            out[f"{name}.bias"] = np.zeros(channels, np.float32)
    return out


def write_diffusers(dst: str, tensors: dict[str, np.ndarray], cfg: VAEConfig) -> str:
    config = cfg.to_diffusers_config()  # raises before anything is written if it cannot be expressed
    if cfg.asymmetric:
        dtype = next(iter(tensors.values())).dtype
        tensors = {**tensors, **{k: v.astype(dtype) for k, v in identity_quant_convs(cfg).items()}}
    config["_diffusers_version"] = _diffusers_version()
    with atomic_output(dst, is_dir=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        _save_safetensors(os.path.join(tmp, DIFFUSERS_WEIGHTS_NAME), tensors, {"format": "pt"})
    return dst


def write_ldm(dst: str, tensors: dict[str, np.ndarray], cfg: VAEConfig) -> str:
    if not dst.lower().endswith(".safetensors"):
        raise ValueError(f"{dst}: the ldm format is one file; give a path ending in .safetensors")
    ldm = diffusers_to_ldm(tensors)
    with atomic_output(dst, is_dir=False) as tmp:
        _save_safetensors(tmp, ldm, {"format": "pt", "asymvq_config": json.dumps(cfg.to_dict())})
    return dst


def write_asymvq(dst: str, flax_params: dict[K.Path, np.ndarray], cfg: VAEConfig) -> str:
    tensors = {K.path_to_str(p): v for p, v in flax_params.items()}
    cfg_json = cfg.to_dict()
    metadata = {"format": "asymvq", "asymvq_format_version": str(ASYMVQ_FORMAT_VERSION),
                "asymvq_config": json.dumps(cfg_json)}
    if dst.lower().endswith(".safetensors"):
        with atomic_output(dst, is_dir=False) as tmp:
            _save_safetensors(tmp, tensors, metadata)
        return dst
    with atomic_output(dst, is_dir=True) as tmp:
        with open(os.path.join(tmp, ASYMVQ_CONFIG), "w") as f:
            json.dump({"format": "asymvq", "format_version": ASYMVQ_FORMAT_VERSION, "config": cfg_json}, f, indent=2)
            f.write("\n")
        _save_safetensors(os.path.join(tmp, ASYMVQ_WEIGHTS), tensors, metadata)
    return dst
