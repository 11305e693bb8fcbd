"""Helpers for tests that compare against diffusers' PyTorch models (needs the `torch` extra)."""

import inspect

import numpy as np
import torch
from flax import nnx

from asymvq_jax.models import AutoencoderKL, VAEConfig


def diffusers_vae(config: VAEConfig, seed: int = 0):
    """A diffusers model of the same shape with random weights (non-trivial norm affine too)."""
    import diffusers
    torch.manual_seed(seed)
    cfg = config.to_diffusers_config()
    cls = getattr(diffusers, cfg.pop("_class_name"))
    if cfg.get("shift_factor") is None:
        cfg.pop("shift_factor", None)  # to_diffusers_config leaves it out when None
    accepted = inspect.signature(cls.__init__).parameters  # AsymmetricAutoencoderKL: no quant-conv flags, no shift
    model = cls(**{k: v for k, v in cfg.items() if k in accepted}).eval()
    with torch.no_grad():  # GroupNorm starts at scale 1, bias 0: randomise to test their mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_key(path) -> str:
    """Independent of the converter: the flax path -> diffusers key rule, restated for the tests."""
    *head, leaf = map(str, path)
    return ".".join(head + ["weight" if leaf in ("kernel", "scale") else leaf])


def flax_from_torch(config: VAEConfig, torch_model) -> AutoencoderKL:
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = AutoencoderKL(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        w = sd.pop(torch_key(path))
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        elif w.ndim == 2:
            w = w.T
        assert w.shape == var[...].shape, (path, w.shape, var[...].shape)
        var[...] = w
    assert not sd, f"torch keys with no flax parameter: {sorted(sd)}"
    nnx.update(model, state)
    return model


def to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)
