"""from_pretrained / save_pretrained: checkpoints <-> the Flax NNX AutoencoderKL."""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asymvq_jax.models.autoencoder import AutoencoderKL
from asymvq_jax.models.config import VAEConfig

from . import keys as K
from . import writers
from .errors import CorruptFileError, KeyMismatchError, ShapeMismatchError
from .readers import Checkpoint, read_checkpoint

log = logging.getLogger(__name__)

_MAX_LISTED = 40


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# diffusers tensors <-> Flax params (pure numpy)
# --------------------------------------------------------------------------------------------

def diffusers_to_flax_params(tensors: dict[str, np.ndarray], expected: dict[K.Path, tuple[int, ...]] | None = None
                             ) -> dict[K.Path, np.ndarray]:
    """diffusers-layout tensors as Flax params, checked against `expected` {path: Flax shape}:
    missing and unexpected keys (diffusers names) and shape mismatches raise, each listed."""
    params: dict[K.Path, np.ndarray] = {}
    unknown: list[str] = []
    for k, v in tensors.items():
        try:
            path, arr = K.diffusers_to_flax(k, v)
        except ValueError:
            unknown.append(k)
            continue
        params[path] = arr
    if expected is None:
        if unknown:
            raise KeyMismatchError(f"unexpected keys: {_listing(sorted(unknown))}", [], sorted(unknown))
        return params
    missing = sorted(_dkey(p) for p in expected if p not in params)
    unexpected = sorted(unknown + [_dkey(p) for p in params if p not in expected])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise KeyMismatchError("checkpoint does not fit the model (keys in diffusers naming): " + "; ".join(parts),
                               missing, unexpected)
    mismatches = []
    for p, shape in expected.items():
        if tuple(params[p].shape) != tuple(shape):
            mismatches.append((_dkey(p), K.flax_shape_to_diffusers(p, tuple(shape)),
                               K.flax_shape_to_diffusers(p, tuple(params[p].shape))))
    if mismatches:
        lines = "; ".join(f"{k}: expected {e}, got {g}" for k, e, g in mismatches[:_MAX_LISTED])
        raise ShapeMismatchError(f"{len(mismatches)} shape mismatches (torch layout): {lines}", mismatches)
    return params


def _dkey(path: K.Path) -> str:
    *module, leaf = (str(p) for p in path)
    return ".".join(module + ["bias" if leaf == "bias" else "weight"])


def flax_params_to_diffusers(params: dict[K.Path, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for p, v in params.items():
        k, arr = K.flax_to_diffusers(p, v)
        out[k] = arr
    return out


# --------------------------------------------------------------------------------------------
# the NNX model
# --------------------------------------------------------------------------------------------

def abstract_model(cfg: VAEConfig, *, dtype=None, param_dtype=None):
    """The model's structure and shapes, without running its initialisers."""
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype

    def make():
        return AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    return make, nnx.eval_shape(make)


def expected_shapes(abstract) -> dict[K.Path, tuple[int, ...]]:
    return {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def build_model(cfg: VAEConfig, params: dict[K.Path, np.ndarray], *, dtype=None, param_dtype=None):
    """An AutoencoderKL holding `params` (Flax layout); every parameter must be given."""
    make, abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(abs_params)
    filled = []
    for path, var in flat:
        arr = params[tuple(path)]
        target = var.dtype if param_dtype is None else param_dtype
        filled.append((path, var.replace(jnp.asarray(arr, dtype=target))))
    if jax.tree.leaves(abs_rest):
        # Non-parameter state (RNG streams): compute just that; XLA drops the unused initialisers.
        rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[2])()
    else:
        rest = abs_rest
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def model_params(vae) -> dict[K.Path, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def check_finite(ckpt: Checkpoint) -> None:
    bad = sorted(k for k, v in ckpt.tensors.items()
                 if v.dtype.kind not in "biu" and not np.isfinite(np.asarray(v, np.float32)).all())
    if bad:
        raise CorruptFileError(f"{ckpt.source}: {len(bad)} tensors hold NaN or Inf ({_listing(bad)}); "
                               "expected finite weights")


def load_checkpoint_params(ckpt: Checkpoint, abstract) -> dict[K.Path, np.ndarray]:
    check_finite(ckpt)
    try:
        return diffusers_to_flax_params(ckpt.tensors, expected_shapes(abstract))
    except KeyMismatchError as e:
        raise KeyMismatchError(f"{ckpt.source} ({ckpt.layout}): {e}", e.missing, e.unexpected) from None
    except ShapeMismatchError as e:
        raise ShapeMismatchError(f"{ckpt.source} ({ckpt.layout}, config {ckpt.config}): {e}", e.mismatches) from None


def from_pretrained(path: str | os.PathLike, *, allow_pickle: bool = False, dtype: Any = None,
                    param_dtype: Any = None, config: VAEConfig | None = None, family: str | None = None):
    """Load an AutoencoderKL from any supported checkpoint.

    `path`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin, or a
    pipeline folder with vae/), a single .safetensors/.ckpt/.bin in original LDM layout (a whole
    SD checkpoint with `first_stage_model.` is fine; the rest is dropped), an Asymmetric_VQGAN
    Lightning checkpoint, or our own asymvq folder/file. Pickles need `allow_pickle=True`.
    `config` overrides the read/inferred config (only needed for non-default norm groups of bare
    LDM files). `family` ("sd", "sdxl", "sd3", "flux") gives the latent factors of a single file
    without a config, FLUX's ae.safetensors or SD3's checkpoint among them: a 4-channel file is SD
    unless told "sdxl", a 16-channel one needs "sd3" or "flux" unless the file says which.
    dtype/param_dtype default to float32.
    """
    cfg, params = read_params(path, allow_pickle=allow_pickle, config=config, family=family)
    return build_model(cfg, params, dtype=dtype, param_dtype=param_dtype)


def read_params(path: str | os.PathLike, *, allow_pickle: bool = False, config: VAEConfig | None = None,
                family: str | None = None) -> tuple[VAEConfig, dict[K.Path, np.ndarray]]:
    """The config and the Flax-layout parameters (host memory) of any checkpoint from_pretrained reads."""
    ckpt = read_checkpoint(os.fspath(path), allow_pickle=allow_pickle, config=config, family=family)
    return ckpt.config, load_checkpoint_params(ckpt, abstract_model(ckpt.config)[1])


def save_pretrained(vae, out: str | os.PathLike, format: str = "diffusers", *, dtype: Any = None,
                    force: bool = False) -> str:
    """Export `vae` as "diffusers" (folder), "ldm" (one .safetensors) or "asymvq" (ours: folder,
    or one file when `out` ends in .safetensors). `dtype` (e.g. np.float16) casts the weights;
    default: as held. Returns the written path. See `writers` for the formats.

    An existing `out` must be a previous export of the same format; `force=True` writes into
    anything else, replacing only the files the export writes."""
    out = os.fspath(out)
    if format not in writers.FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {writers.FORMATS}")
    writers.check_destination(out, format, force=force)
    cfg: VAEConfig = vae.config
    params = model_params(vae)
    if dtype is not None:
        params = {p: v.astype(dtype) for p, v in params.items()}
    if format == "asymvq":
        return writers.write_asymvq(out, params, cfg)
    tensors = flax_params_to_diffusers(params)
    if format == "diffusers":
        return writers.write_diffusers(out, tensors, cfg)
    return writers.write_ldm(out, tensors, cfg)
