"""Read checkpoints into one form: a diffusers-layout dict of numpy arrays plus a config.

Sources: diffusers folders, single files in original LDM layout (also whole SD checkpoints with
`first_stage_model.`, and Asymmetric_VQGAN Lightning checkpoints), and our own format
(see `writers.py`). `.safetensors` is read with numpy only; pickles (`.ckpt`, `.bin`, `.pt`,
`.pth`) need torch and an explicit `allow_pickle=True`, since unpickling can run code.
"""

import dataclasses
import io
import json
import logging
import os
import re
from collections import Counter

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from asymvq_jax import paths
from asymvq_jax.models.config import FAMILIES, PRESETS, ConfigError, VAEConfig
from asymvq_jax.models.config import family as family_fields

from . import keys as K
from .errors import CorruptFileError, PickleNotAllowedError, UnknownFormatError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
ASYMVQ_CONFIG = "asymvq_config.json"
ASYMVQ_WEIGHTS = "params.safetensors"
ASYMVQ_FORMAT_VERSION = 1

# Keys of Asymmetric_VQGAN training checkpoints that no inference model uses.
_DROPPED_PREFIXES = ("decoder.up_layers.", "loss.")
# diffusers' pre-0.14 attention names, still found in some published folders.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass
class Checkpoint:
    """What a reader found: diffusers-layout tensors (torch layout) and how it got them."""
    tensors: dict[str, np.ndarray]
    config: VAEConfig
    layout: str  # "diffusers" | "ldm" | "sd-full" | "asymmetric-vqgan" | "asymvq"
    source: str

    @property
    def preset_name(self) -> str:
        return match_preset(self.config)

    @property
    def family(self) -> str:
        return self.config.family


# --------------------------------------------------------------------------------------------
# raw file readers
# --------------------------------------------------------------------------------------------

def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, with numpy only (no torch, no pickle)."""
    try:
        with paths.local_copy(path) as local, safe_open(local, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # optional: only pickles need it
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A torch pickle's state dict; Lightning checkpoints are unwrapped from `state_dict`."""
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{path} is a pickle (.ckpt/.bin/.pt/.pth): loading a pickle can run arbitrary code, so it "
            "is refused by default. If you trust the file, pass allow_pickle=True (CLI: --allow-pickle); "
            "it is then read with torch.load(weights_only=True). Better: convert it to .safetensors once.")
    try:
        import torch  # optional: only pickles need it
    except ImportError as e:
        raise ImportError(f"reading the pickle {path} needs torch (pip install 'asymvq-jax[torch]')") from e
    try:
        obj = torch.load(io.BytesIO(paths.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here: UnpicklingError, RuntimeError, EOFError...
        raise CorruptFileError(f"{path}: torch.load(weights_only=True) failed (truncated or corrupt file, or "
                               f"it holds objects other than tensors): {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning
    if not isinstance(obj, dict):
        raise UnknownFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out, skipped = {}, []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = _torch_to_numpy(v)
        else:
            skipped.append(k)
    if skipped:
        log.info("%s: skipped %d non-tensor entries: %s", path, len(skipped), skipped[:10])
    return out


def read_file(path: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not paths.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return read_safetensors(path)
    if lower.endswith(PICKLE_SUFFIXES):
        return read_pickle(path, allow_pickle), {}
    raise UnknownFormatError(f"{path}: unknown file type; expected .safetensors, or a pickle "
                             f"({', '.join(PICKLE_SUFFIXES)}) with allow_pickle=True")


# --------------------------------------------------------------------------------------------
# layout detection and normalisation to diffusers keys
# --------------------------------------------------------------------------------------------

def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("first_stage_model.") for k in keys):
        return "sd-full"
    if any(k.endswith((".kernel", ".scale")) for k in keys):
        return "asymvq"
    if any(re.match(r"(encoder\.down_blocks|decoder\.up_blocks|(en|de)coder\.mid_block)\.", k) for k in keys):
        return "diffusers"
    if any(re.match(r"(encoder\.down\.\d+|decoder\.up\.\d+|(en|de)coder\.mid\.)", k) for k in keys):
        if any(k.startswith(("decoder.encoder.layers.", "decoder.up_layers.")) for k in keys):
            return "asymmetric-vqgan"
        return "ldm"
    sample = sorted(keys)[:8]
    raise UnknownFormatError(f"no known VAE layout (diffusers, LDM, Asymmetric_VQGAN, asymvq) in {len(keys)} keys; "
                             f"first keys: {sample}")


def summarize_prefixes(names, depth: int = 2) -> dict[str, int]:
    return dict(Counter(".".join(n.split(".")[:depth]) for n in names))


def _legacy_attention(key: str) -> str:
    m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)\Z", key)
    return f"{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key


def to_diffusers_layout(tensors: dict[str, np.ndarray], layout: str, source: str) -> dict[str, np.ndarray]:
    """Rename to diffusers keys (torch layout). Unknown keys keep their name, so that the model
    check reports them as unexpected; keys that no model uses are dropped (and logged)."""
    dropped: list[str] = []
    if layout == "sd-full":
        dropped = [k for k in tensors if not k.startswith("first_stage_model.")]
        tensors = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
        layout = detect_layout(tensors)
    if layout in ("ldm", "asymmetric-vqgan"):
        unused = [k for k in tensors if k.startswith(_DROPPED_PREFIXES)]
        dropped += unused
        n_up = K.num_up_blocks_of_ldm(tensors)
        out = {}
        for k, v in tensors.items():
            if k.startswith(_DROPPED_PREFIXES):
                continue
            new = K.ldm_to_diffusers_key(k, n_up)
            out[new or k] = v if new is None else K.ldm_to_diffusers_array(new, v)
        tensors = out
    elif layout == "diffusers":
        tensors = {_legacy_attention(k): v for k, v in tensors.items()}
        tensors = {k: K.ldm_to_diffusers_array(k, v) for k, v in tensors.items()}  # legacy 1x1-conv attention
    elif layout == "asymvq":
        out = {}
        for k, v in tensors.items():
            if k.endswith((".kernel", ".scale", ".bias")):
                new, arr = K.flax_to_diffusers(K.str_to_path(k), v)
                out[new] = arr
            else:
                out[k] = v
        tensors = out
    if dropped:
        log.info("%s: dropped %d keys no model uses: %s", source, len(dropped), summarize_prefixes(dropped))
    return tensors


# --------------------------------------------------------------------------------------------
# config inference
# --------------------------------------------------------------------------------------------

def _count(tensors, pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(tensors: dict[str, np.ndarray], base: VAEConfig | None = None) -> VAEConfig:
    """A config from diffusers-layout tensor shapes (the quant convs from their presence).
    norm_num_groups, scaling_factor and shift_factor are not in the weights: they come from
    `base` (defaults: 32, 0.18215, None)."""
    base = base or VAEConfig()
    try:
        n_down = _count(tensors, r"encoder\.down_blocks\.(\d+)\.")
        n_up = _count(tensors, r"decoder\.up_blocks\.(\d+)\.")
        down = tuple(int(tensors[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n_down))
        up = tuple(int(tensors[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n_up))[::-1]
        layers_down = _count(tensors, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        layers_up = _count(tensors, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1
        fields = dict(
            in_channels=int(tensors["encoder.conv_in.weight"].shape[1]),
            out_channels=int(tensors["decoder.conv_out.weight"].shape[0]),
            down_block_out_channels=down, layers_per_down_block=layers_down,
            up_block_out_channels=up, layers_per_up_block=layers_up,
            latent_channels=int(tensors["decoder.conv_in.weight"].shape[1]),
            use_quant_conv="quant_conv.weight" in tensors, use_post_quant_conv="post_quant_conv.weight" in tensors,
            asymmetric=any(k.startswith("decoder.condition_encoder.") for k in tensors))
    except KeyError as e:
        raise UnknownFormatError(f"cannot infer the model shape: key {e.args[0]} is missing") from e
    if not down or not up:
        raise UnknownFormatError("cannot infer the model shape: no encoder down blocks or decoder up blocks")
    try:
        return base.replace(**fields)
    except ValueError as e:
        raise UnknownFormatError(f"the inferred shape {fields} does not make a valid config ({e}); "
                                 "pass config=VAEConfig(...) (e.g. another norm_num_groups)") from e


def _architecture(cfg: VAEConfig) -> VAEConfig:
    """The widths alone: a preset names a size, whatever the latent family."""
    return cfg.replace(**family_fields("sd"))


def match_preset(cfg: VAEConfig) -> str:
    for name, p in PRESETS.items():
        if _architecture(p) == _architecture(cfg):
            return name
    return "custom"


def config_from_json(d: dict, source: str) -> VAEConfig:
    return config_at(source, VAEConfig.from_dict, d)


def config_at(source: str, make, *args) -> VAEConfig:
    """`make(*args)`, a config error naming the file `source` it came from."""
    try:
        return make(*args)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------
# the latent family
# --------------------------------------------------------------------------------------------

# Keys of the other models in a whole checkpoint that name its family.
_FAMILY_KEYS = (("model.diffusion_model.joint_blocks.", "sd3"), ("conditioner.embedders.1.", "sdxl"),
                ("cond_stage_model.", "sd"))
# Words of Stability's `modelspec.architecture` metadata.
_FAMILY_WORDS = (("xl", "sdxl"), ("v3", "sd3"), ("sd3", "sd3"), ("flux", "flux"), ("stable-diffusion-v", "sd"))


def family_said(keys, metadata: dict[str, str]) -> tuple[str, str] | None:
    """(family, where the file says it) from other models' keys or the metadata, else None."""
    for prefix, name in _FAMILY_KEYS:
        if any(k.startswith(prefix) for k in keys):
            return name, f"its {prefix}* keys"
    arch = metadata.get("modelspec.architecture", "").lower()
    for word, name in _FAMILY_WORDS:
        if word in arch:
            return name, f"modelspec.architecture={arch!r}"
    return None


def family_config(tensors: dict[str, np.ndarray], said: tuple[str, str] | None, chosen: str | None,
                  source: str) -> VAEConfig:
    """The config of a file without one: shapes from the tensors, factors from its family, which is
    `chosen`, else what the file says, else SD for 4 latent channels. 16 channels may be SD3 or FLUX
    (same shapes, different factors), so they need one of those."""
    if chosen is not None:
        family_fields(chosen)  # an unknown name raises
        if said is not None and said[0] != chosen:
            raise UnknownFormatError(f"{source}: family={chosen!r} given, but the file says {said[0]!r} ({said[1]})")
    shapes = infer_config(tensors)
    name = chosen or (said[0] if said else None)
    if name is None:
        matches = [n for n, f in FAMILIES.items() if f["latent_channels"] == shapes.latent_channels
                   and f["use_quant_conv"] == shapes.use_quant_conv]
        if len(matches) > 1 and shapes.latent_channels != 4:
            raise UnknownFormatError(f"{source}: {shapes.latent_channels} latent channels fit {' and '.join(matches)}, "
                                     "whose weights look the same: choose with family="
                                     f"{'|'.join(repr(m) for m in matches)} (CLI: --family)")
        name = matches[0] if matches else None
    if name is None:
        log.info("%s: %d latent channels fit no known family; default factors", source, shapes.latent_channels)
        return shapes
    fam = family_fields(name)
    for field in ("latent_channels", "use_quant_conv", "use_post_quant_conv"):
        if fam[field] != getattr(shapes, field):
            raise UnknownFormatError(f"{source}: family {name!r} has {field}={fam[field]}, the file "
                                     f"{getattr(shapes, field)}")
    return shapes.replace(**fam)


def _check_chosen_family(cfg: VAEConfig, chosen: str | None, source: str) -> None:
    if chosen is not None and family_fields(chosen) and cfg.family != chosen:
        raise UnknownFormatError(f"{source}: family={chosen!r} given, but its config says {cfg.family!r} "
                                 f"(scaling_factor={cfg.scaling_factor}, shift_factor={cfg.shift_factor})")


_IDENTITY_QUANT_CONVS = (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv"))


def drop_identity_quant_convs(tensors: dict[str, np.ndarray], cfg: VAEConfig, source: str) -> dict[str, np.ndarray]:
    """Our diffusers export of a family without quant convs holds identity ones (the class always
    has them); the config says so. Drops them, after checking they are exactly the identity."""
    out = dict(tensors)
    for name, flag in _IDENTITY_QUANT_CONVS:
        if getattr(cfg, flag) or f"{name}.weight" not in out:
            continue
        w, b = out.pop(f"{name}.weight"), out.pop(f"{name}.bias", None)
        eye = np.eye(w.shape[0], dtype=np.float32)[:, :, None, None]
        if w.shape != eye.shape or not np.array_equal(w.astype(np.float32), eye) or (b is not None and np.any(b)):
            raise UnknownFormatError(f"{source}: config says {flag}=false but {name} is not the identity")
    return out


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------

def read_json_object(path: str) -> dict:
    try:
        d = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object {{...}}, got {type(d).__name__} {json.dumps(d)[:60]}")
    return d


def _find_folder_weights(folder: str, names) -> str | None:
    for name in names:
        if paths.isfile(paths.join(folder, name)):
            return paths.join(folder, name)
    return None


def read_checkpoint(path: str, *, allow_pickle: bool = False, config: VAEConfig | None = None,
                    family: str | None = None) -> Checkpoint:
    """Any supported source as diffusers-layout tensors + a config. `config` overrides what is
    read or inferred (e.g. norm_num_groups of bare LDM files). `family` (sd, sdxl, sd3, flux)
    gives the factors of a file without a config (`family_config`), and must agree with a config."""
    path = os.fspath(path)
    json_cfg: VAEConfig | None = None
    if paths.isdir(path):
        if paths.isfile(paths.join(path, ASYMVQ_CONFIG)):
            meta = read_json_object(paths.join(path, ASYMVQ_CONFIG))
            version = meta.get("format_version")
            if meta.get("format") != "asymvq" or not isinstance(version, int) or version > ASYMVQ_FORMAT_VERSION:
                raise UnknownFormatError(f"{path}/{ASYMVQ_CONFIG}: format {meta.get('format')!r} version {version!r}; "
                                         f"this code reads asymvq versions <= {ASYMVQ_FORMAT_VERSION}")
            json_cfg = config_from_json(meta.get("config", {}), paths.join(path, ASYMVQ_CONFIG))
            weights = paths.join(path, ASYMVQ_WEIGHTS)
            if not paths.isfile(weights):
                raise UnknownFormatError(f"{path}: has {ASYMVQ_CONFIG} but no {ASYMVQ_WEIGHTS}")
        elif paths.isfile(paths.join(path, "config.json")):
            json_cfg = config_at(paths.join(path, "config.json"), VAEConfig.from_diffusers_config,
                                 read_json_object(paths.join(path, "config.json")))
            weights = _find_folder_weights(path, DIFFUSERS_WEIGHTS)
            if weights is None:
                vae = paths.join(path, "vae")
                hint = f" (a pipeline folder? pass {vae})" if paths.isdir(vae) else ""
                raise UnknownFormatError(f"{path}: diffusers config.json but none of {DIFFUSERS_WEIGHTS}{hint}")
        elif paths.isdir(paths.join(path, "vae")):
            return read_checkpoint(paths.join(path, "vae"), allow_pickle=allow_pickle, config=config, family=family)
        else:
            raise UnknownFormatError(f"{path}: folder with neither config.json (diffusers) nor {ASYMVQ_CONFIG} (asymvq)")
    else:
        weights = path
    tensors, metadata = read_file(weights, allow_pickle)
    if not tensors:
        raise UnknownFormatError(f"{weights}: holds no tensors")
    if json_cfg is None and "asymvq_config" in metadata:
        try:
            json_cfg = config_from_json(json.loads(metadata["asymvq_config"]),
                                        f"{weights} (metadata asymvq_config)")
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{weights}: bad asymvq_config metadata: {e}") from e
    layout = detect_layout(tensors)
    said = family_said(tensors, metadata)
    tensors = to_diffusers_layout(tensors, layout, weights)
    if config is not None:
        cfg = config
    elif json_cfg is not None:
        _check_chosen_family(json_cfg, family, weights)
        cfg = json_cfg
    else:
        cfg = family_config(tensors, said, family, weights)
    tensors = drop_identity_quant_convs(tensors, cfg, weights)
    ckpt = Checkpoint(tensors=tensors, config=cfg, layout=layout, source=weights)
    how = ("config given" if config else "its config" if json_cfg else f"said by {said[1]}" if said and not family
           else "family given" if family else "from the latent channels")
    log.info("%s: format %s, family %s (%s), preset %s (%s decoder, down %s x%d, up %s x%d, latent %d)", path,
             layout, ckpt.family, how, ckpt.preset_name, "asymmetric" if cfg.asymmetric else "plain",
             list(cfg.down_block_out_channels), cfg.layers_per_down_block, list(cfg.up_block_out_channels),
             cfg.layers_per_up_block, cfg.latent_channels)
    return ckpt
