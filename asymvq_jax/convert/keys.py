"""The one naming rule between original-LDM keys, diffusers keys and Flax NNX paths.

Three layouts hold the same tensors:

* **diffusers** (`AutoencoderKL` / `AsymmetricAutoencoderKL` state dicts) is the hub layout:
  `encoder.down_blocks.0.resnets.1.conv1.weight`, torch OIHW conv kernels, (out, in) linear
  weights, GroupNorm `weight`.
* **Flax** paths are the diffusers key split on "." (list indices as ints), with the final
  `weight` renamed to `kernel` (Conv / Linear) or `scale` (GroupNorm); conv kernels are HWIO,
  linear kernels (in, out).
* **LDM** (CompVis / Stability / Asymmetric_VQGAN) names modules differently
  (`encoder.down.0.block.1`, `mid.attn_1.q`, `norm_out`, `nin_shortcut`, decoder `up.N`
  numbered in reverse) and stores the attention projections as 1x1 convs. The asymmetric
  branch is `decoder.encoder.layers.N` there (diffusers: `decoder.condition_encoder.layers.N`).

Every conversion below is written once as a pair of templates (`_MODULE_RULES`) or as a
name+ndim decision (`leaf_kind`), and each direction is the inverse of the other.
"""

import re
from typing import Callable

import numpy as np

# --------------------------------------------------------------------------------------------
# LDM module names <-> diffusers module names
# --------------------------------------------------------------------------------------------

# Placeholders: {part} encoder|decoder; {i}, {j}, {k} integers copied as they are; {up} the
# diffusers up-block index, whose LDM twin is n_up - 1 - up; {res}/{attn} a resnet / attention
# sub-layer name, translated with the tables below.
_RESNET_SUBLAYERS = {  # LDM -> diffusers
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION_SUBLAYERS = {  # LDM -> diffusers
    "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
}

_MODULE_RULES: list[tuple[str, str]] = [  # (LDM module, diffusers module)
    ("{part}.conv_in", "{part}.conv_in"),
    ("encoder.down.{i}.block.{j}.{res}", "encoder.down_blocks.{i}.resnets.{j}.{res}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("{part}.mid.block_1.{res}", "{part}.mid_block.resnets.0.{res}"),
    ("{part}.mid.attn_1.{attn}", "{part}.mid_block.attentions.0.{attn}"),
    ("{part}.mid.block_2.{res}", "{part}.mid_block.resnets.1.{res}"),
    ("decoder.up.{up}.block.{j}.{res}", "decoder.up_blocks.{up}.resnets.{j}.{res}"),
    ("decoder.up.{up}.upsample.conv", "decoder.up_blocks.{up}.upsamplers.0.conv"),
    ("decoder.encoder.layers.{k}", "decoder.condition_encoder.layers.{k}"),
    ("{part}.norm_out", "{part}.conv_norm_out"),
    ("{part}.conv_out", "{part}.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
]


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def _placeholder_regex(side: int) -> dict[str, str]:
    res = _RESNET_SUBLAYERS.keys() if side == 0 else _RESNET_SUBLAYERS.values()
    attn = _ATTENTION_SUBLAYERS.keys() if side == 0 else _ATTENTION_SUBLAYERS.values()
    return {"part": "encoder|decoder", "i": r"\d+", "j": r"\d+", "k": r"\d+", "up": r"\d+",
            "res": _alternatives(res), "attn": _alternatives(attn)}


def _compile(template: str, side: int) -> re.Pattern:
    regex = _placeholder_regex(side)
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{regex[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


_COMPILED = [(_compile(ldm, 0), _compile(diff, 1), ldm, diff) for ldm, diff in _MODULE_RULES]
_RES_BACK = {v: k for k, v in _RESNET_SUBLAYERS.items()}
_ATTN_BACK = {v: k for k, v in _ATTENTION_SUBLAYERS.items()}


def _translate_module(name: str, to_diffusers: bool, num_up_blocks: int) -> str | None:
    for ldm_re, diff_re, ldm_t, diff_t in _COMPILED:
        m = (ldm_re if to_diffusers else diff_re).match(name)
        if m is None:
            continue
        values = m.groupdict()
        if "up" in values:  # LDM numbers the decoder levels from high resolution up
            values["up"] = str(num_up_blocks - 1 - int(values["up"]))
        if "res" in values:
            values["res"] = (_RESNET_SUBLAYERS if to_diffusers else _RES_BACK)[values["res"]]
        if "attn" in values:
            values["attn"] = (_ATTENTION_SUBLAYERS if to_diffusers else _ATTN_BACK)[values["attn"]]
        return (diff_t if to_diffusers else ldm_t).format(**values)
    return None


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def is_attention_projection(diffusers_key: str) -> bool:
    """The four attention projections: linear in diffusers and Flax, 1x1 convs in LDM."""
    module, param = _split_param(diffusers_key)
    return param == "weight" and re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\Z", module) is not None


def ldm_to_diffusers_key(key: str, num_up_blocks: int) -> str | None:
    """An LDM key's diffusers twin, or None when the rule does not know the key."""
    module, param = _split_param(key)
    if param not in ("weight", "bias"):
        return None
    name = _translate_module(module, True, num_up_blocks)
    return None if name is None else f"{name}.{param}"


def diffusers_to_ldm_key(key: str, num_up_blocks: int) -> str | None:
    module, param = _split_param(key)
    if param not in ("weight", "bias"):
        return None
    name = _translate_module(module, False, num_up_blocks)
    return None if name is None else f"{name}.{param}"


def ldm_to_diffusers_array(diffusers_key: str, value: np.ndarray) -> np.ndarray:
    if is_attention_projection(diffusers_key) and value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(f"{diffusers_key}: an attention projection must be a 1x1 conv, got shape {value.shape}")
        return value[:, :, 0, 0]
    return value


def diffusers_to_ldm_array(diffusers_key: str, value: np.ndarray) -> np.ndarray:
    if is_attention_projection(diffusers_key) and value.ndim == 2:
        return value[:, :, None, None]
    return value


# --------------------------------------------------------------------------------------------
# diffusers keys <-> Flax paths
# --------------------------------------------------------------------------------------------

_NORM_NAMES = re.compile(r"(^|\.)(norm\d*|group_norm|conv_norm_out|norm_out)\Z")

Path = tuple[str | int, ...]


def leaf_kind(diffusers_key: str, ndim: int) -> str:
    """'conv', 'linear', 'norm' or 'bias', decided from the key's name and the tensor's rank."""
    module, param = _split_param(diffusers_key)
    if param == "bias":
        return "bias"
    if param != "weight":
        raise ValueError(f"{diffusers_key}: expected a parameter named weight or bias")
    if ndim == 4:
        return "conv"
    if ndim == 2 and is_attention_projection(diffusers_key):
        return "linear"
    if ndim == 1 and _NORM_NAMES.search(module):
        return "norm"
    raise ValueError(f"{diffusers_key}: cannot tell the layer kind of a {ndim}-D weight")


_FLAX_NAME = {"conv": "kernel", "linear": "kernel", "norm": "scale", "bias": "bias"}
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "linear": lambda a: a.T,  # (out, in) -> (in, out)
    "norm": lambda a: a,
    "bias": lambda a: a,
}
_FROM_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
    "linear": lambda a: a.T,
    "norm": lambda a: a,
    "bias": lambda a: a,
}


def diffusers_to_flax(key: str, value: np.ndarray) -> tuple[Path, np.ndarray]:
    """A diffusers (key, torch-layout array) as a (Flax path, Flax-layout array)."""
    kind = leaf_kind(key, value.ndim)
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    parts[-1] = _FLAX_NAME[kind]
    return tuple(parts), np.ascontiguousarray(_TO_FLAX[kind](value))


def flax_to_diffusers(path: Path, value: np.ndarray) -> tuple[str, np.ndarray]:
    """The exact inverse of `diffusers_to_flax`."""
    *module, leaf = (str(p) for p in path)
    key = ".".join(module + ["bias" if leaf == "bias" else "weight"])
    if leaf not in ("kernel", "scale", "bias"):
        raise ValueError(f"Flax path {path}: expected a leaf named kernel, scale or bias")
    kind = leaf_kind(key, value.ndim)
    if _FLAX_NAME[kind] != leaf:
        raise ValueError(f"Flax path {path}: a {value.ndim}-D {leaf} does not fit the {kind} rule")
    return key, np.ascontiguousarray(_FROM_FLAX[kind](value))


def path_to_str(path) -> str:
    """'decoder.up_blocks.0.conv1.kernel' from a Flax path or a jax key path: the one dotted form
    (our own format's keys, checkpoint listings, optimizer labels)."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def str_to_path(name: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def num_up_blocks_of_ldm(keys) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def num_up_blocks_of_diffusers(keys) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def flax_shape_to_diffusers(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape of a Flax leaf (for error messages and checks, no data)."""
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)
