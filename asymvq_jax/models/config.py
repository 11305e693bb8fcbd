"""Autoencoder configuration, the published presets, the latent families, and the diffusers config.json mapping."""

import dataclasses
import json
import math
import numbers
from typing import Any


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range; says key and expectation."""


def _is_count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(key: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_short(value)}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shape of an SD-style KL autoencoder; `asymmetric` adds the masked-image branch.

    Channel tuples are in diffusers order (high resolution first). The latent family (see `FAMILIES`)
    is `latent_channels`, the factors and the quant convs: SD3 and FLUX have no 1x1 convs around
    the latent, so `use_quant_conv`/`use_post_quant_conv` false leaves them out of the model.
    Scaled latents, as diffusion models see them, are `(z - shift_factor) * scaling_factor`.
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_down_block: int = 2
    up_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_up_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    asymmetric: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups",
                     "layers_per_down_block", "layers_per_up_block"):
            _expect(name, getattr(self, name), _is_count(getattr(self, name)), "a positive integer")
        for name in ("down_block_out_channels", "up_block_out_channels"):
            value = getattr(self, name)
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_is_count, value))
            _expect(name, value, ok, "a non-empty list of positive integers, e.g. [128, 256, 512, 512]")
            channels = tuple(value)
            object.__setattr__(self, name, channels)
            bad = [c for c in channels if c % self.norm_num_groups]
            if bad:
                raise ConfigError(f"{name}={list(channels)}: expected multiples of norm_num_groups="
                                  f"{self.norm_num_groups}; {bad} are not")
        _expect("scaling_factor", self.scaling_factor, _is_number(self.scaling_factor) and self.scaling_factor > 0,
                "a positive finite number")
        _expect("shift_factor", self.shift_factor, self.shift_factor is None or _is_number(self.shift_factor),
                "a finite number or null")
        for name in ("use_quant_conv", "use_post_quant_conv", "asymmetric"):
            _expect(name, getattr(self, name), isinstance(getattr(self, name), bool), "true or false")
        if self.asymmetric:
            self._check_blends()

    def branch_widths(self) -> list[int]:
        """Widths of the asymmetric branch's five convs, whose features are at H, H, H/2, H/4 and H/8:
        doubling from the decoder's full-resolution width, capped at its lowest-resolution one."""
        first, last = self.up_block_out_channels[0], self.up_block_out_channels[-1]
        return [min(first * 2**k, last) for k in range(4)] + [last]

    def _check_blends(self):
        """The branch's stride is 16 at any depth (the authors' and diffusers'), so a decoder of up to 4
        levels blends the finest of its features, one after the mid block and one per level; their
        widths must be the decoder's there (diffusers looks them up by shape)."""
        levels = self.up_block_out_channels[::-1]  # low -> high resolution
        blended, branch = [levels[0], *levels], self.branch_widths()[::-1]
        if len(blended) > len(branch) or branch[-len(blended):] != blended:
            raise ConfigError(
                f"up_block_out_channels={list(self.up_block_out_channels)}: the asymmetric decoder needs at most "
                f"4 levels whose widths, low resolution first and the mid block's repeated ({blended}), are "
                f"the branch's at those resolutions ({branch[-len(blended):]})")

    def unscale(self, z):
        """Latents as a diffusion model sees them -> as the encoder gives them."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    # -- our JSON (model_config.json, asymvq_config.json) -------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any) -> "VAEConfig":
        """`to_dict`'s form read back: every key known, every value checked."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object of VAEConfig fields, got {type(d).__name__} {_short(d)}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown keys {unknown}; expected some of {names}")
        return cls(**d)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    @property
    def family(self) -> str:
        """The known family whose latents these are (`FAMILIES`), or "custom"."""
        for name, fam in FAMILIES.items():
            if all(getattr(self, k) == v for k, v in fam.items()):
                return name
        return "custom"

    def scale(self, z):
        """Unscaled latents -> the scaled latents a diffusion model works in."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale(self, z):
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    # -- diffusers config.json --------------------------------------------------------------

    def to_diffusers_config(self) -> dict[str, Any]:
        down, up = self.down_block_out_channels, self.up_block_out_channels
        out = {"in_channels": self.in_channels, "out_channels": self.out_channels, "act_fn": "silu",
               "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
               "sample_size": 256, "scaling_factor": self.scaling_factor,
               "down_block_types": ["DownEncoderBlock2D"] * len(down),
               "up_block_types": ["UpDecoderBlock2D"] * len(up)}
        if self.asymmetric:
            # AsymmetricAutoencoderKL always has quant convs (a family without them is exported with
            # identity ones) and no shift_factor: it ignores these keys (with a warning), written only when
            # they say something, for readers (our import, and users: FLUX/SD3 pipelines read shift_factor).
            kept = {} if self.shift_factor is None else {"shift_factor": self.shift_factor}
            kept.update({k: False for k in ("use_quant_conv", "use_post_quant_conv") if not getattr(self, k)})
            return {"_class_name": "AsymmetricAutoencoderKL", **out,
                    "down_block_out_channels": list(down), "layers_per_down_block": self.layers_per_down_block,
                    "up_block_out_channels": list(up), "layers_per_up_block": self.layers_per_up_block, **kept}
        if down != up or self.layers_per_down_block != self.layers_per_up_block:
            raise ValueError("diffusers' AutoencoderKL has one block_out_channels/layers_per_block for both "
                             f"halves; this config differs: {self}")
        return {"_class_name": "AutoencoderKL", **out, "block_out_channels": list(down),
                "layers_per_block": self.layers_per_down_block, "shift_factor": self.shift_factor,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv}

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "VAEConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"expected a JSON object (diffusers' config), got {type(cfg).__name__} {_short(cfg)}")
        kind = cfg.get("_class_name")
        if kind not in ("AsymmetricAutoencoderKL", "AutoencoderKL"):
            raise ValueError(f"config.json _class_name={kind!r}: expected AutoencoderKL or AsymmetricAutoencoderKL")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"config.json act_fn={cfg['act_fn']!r}: only 'silu' is supported")
        common = {"in_channels": cfg.get("in_channels", 3), "out_channels": cfg.get("out_channels", 3),
                  "latent_channels": cfg.get("latent_channels", 4), "norm_num_groups": cfg.get("norm_num_groups", 32),
                  "scaling_factor": cfg.get("scaling_factor", 0.18215), "shift_factor": cfg.get("shift_factor"),
                  "use_quant_conv": cfg.get("use_quant_conv", True),
                  "use_post_quant_conv": cfg.get("use_post_quant_conv", True)}
        if kind == "AsymmetricAutoencoderKL":
            for key in ("down_block_out_channels", "up_block_out_channels"):
                if key not in cfg:
                    raise ConfigError(f"missing key {key}: expected a list of channel counts, "
                                      "e.g. [128, 256, 512, 512]")
            return cls(**common, asymmetric=True, down_block_out_channels=cfg["down_block_out_channels"],
                       layers_per_down_block=cfg.get("layers_per_down_block", 1),
                       up_block_out_channels=cfg["up_block_out_channels"],
                       layers_per_up_block=cfg.get("layers_per_up_block", 1))
        if cfg.get("mid_block_add_attention", True) is False:  # no published VAE family drops it
            raise ValueError("config.json mid_block_add_attention=false is not supported")
        channels, layers = cfg.get("block_out_channels", (64,)), cfg.get("layers_per_block", 1)
        return cls(**common, asymmetric=False, down_block_out_channels=channels, layers_per_down_block=layers,
                   up_block_out_channels=channels, layers_per_up_block=layers)


# The latent families: what a VAE's latents are to the diffusion models trained on them (diffusers'
# config.json values). A 4-channel SD and SDXL file have the same shapes, as do SD3 and FLUX.
FAMILIES: dict[str, dict[str, Any]] = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
               use_post_quant_conv=True),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=None, use_quant_conv=True,
                 use_post_quant_conv=True),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
}


def family(name: str) -> dict[str, Any]:
    """The config fields of a latent family (`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return dict(FAMILIES[name])


_SD = VAEConfig(asymmetric=False)

PRESETS: dict[str, VAEConfig] = {
        "sd": _SD,
        "asym-base": _SD.replace(asymmetric=True),
        "asym-x1.5": _SD.replace(asymmetric=True, up_block_out_channels=(192, 384, 768, 768), layers_per_up_block=3),
        "asym-x2": _SD.replace(asymmetric=True, up_block_out_channels=(256, 512, 1024, 1024), layers_per_up_block=5),
}


def preset(name: str, **overrides) -> VAEConfig:
    """A published size, optionally changed (e.g. `latent_channels=16` for SD3/FLUX-style latents)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
