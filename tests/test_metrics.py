"""Metrics against their references: PSNR and pre_error by hand, SSIM vs dm-pix and LaMa's formula."""

import numpy as np
import pytest

from asymvq_jax import metrics
from asymvq_jax.data.folder import decode_rgb, list_images
from asymvq_jax.losses.lpips import LPIPS, expected_shapes
from tests.conftest import sample_photos_dir


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four real photos, 96x128 crops in [-1, 1], and a noisy, blurred copy of them."""
    paths = list_images(sample_photos_dir(tmp_path_factory.mktemp("photos")))[:4]
    x = np.stack([decode_rgb(p)[0][:96, :128] for p in paths]).astype(np.float32) / 127.5 - 1
    rng = np.random.default_rng(0)
    y = np.clip(0.5 * (x + np.roll(x, 1, axis=2)) + rng.normal(0, 0.05, x.shape), -1, 1).astype(np.float32)
    return x, y


def half_mask(b, h, w):
    m = np.zeros((b, h, w, 1), np.float32)
    m[:, :, : w // 2] = 1
    return m


def test_psnr_by_hand():
    x = np.zeros((2, 16, 16, 3), np.float32)
    y = np.full_like(x, 0.2)          # 0.1 apart on the [0, 1] scale: MSE 0.01, 20 dB
    y[1, :, :8] = 0.4                 # image 1: 0.2 apart on its left half: MSE 0.04, ~13.98 dB
    np.testing.assert_allclose(metrics.psnr(x, y), [20.0, -10 * np.log10(0.025)], rtol=1e-6)
    left = half_mask(2, 16, 16)
    np.testing.assert_allclose(metrics.psnr(x, y, left), [20.0, -10 * np.log10(0.04)], rtol=1e-6)
    np.testing.assert_allclose(metrics.psnr(x, y, 1 - left), [20.0, 20.0], rtol=1e-6)
    assert np.isnan(metrics.psnr(x, y, np.zeros_like(left))).all()  # no pixel selected


def test_pre_error_by_hand():
    x = np.zeros((3, 8, 8, 3), np.float32)
    y = np.where(half_mask(3, 8, 8) == 1, 1.0, 0.5).repeat(3, axis=-1).astype(np.float32)  # hole off by 0.5, known 0.25
    mask = half_mask(3, 8, 8)
    mask[1] = 1.0                     # image 1: all hole, no known pixel
    mask[2] = 0.0                     # image 2: all known; its hole half counts now too
    np.testing.assert_allclose(metrics.pre_error(x, y, mask), [0.0625, 0.0, (0.0625 + 0.25) / 2], rtol=1e-6)


def lama_ssim(a, b):
    """LaMa's SSIM (saicinpainting.evaluation.losses.ssim.SSIM, size_average=False) in torch:
    a 2-D Gaussian window zero-padded by 5, per channel; images NHWC in [0, 1], float64 so the
    reference carries no rounding of its own."""
    import torch
    import torch.nn.functional as F
    g = torch.tensor([np.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)], dtype=torch.float64)
    g = g / g.sum()
    window = (g[:, None] @ g[None, :]).expand(3, 1, 11, 11).contiguous()
    a, b = torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)
    conv = lambda t: F.conv2d(t, window, padding=5, groups=3)  # noqa: E731
    mu1, mu2 = conv(a), conv(b)
    s11, s22, s12 = conv(a * a) - mu1 ** 2, conv(b * b) - mu2 ** 2, conv(a * b) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return m.mean(1).mean(1).mean(1).numpy()


def test_ssim_equals_lama_formula(photos):
    pytest.importorskip("torch")
    x, y = photos
    want = lama_ssim((x.astype(np.float64) + 1) / 2, (y.astype(np.float64) + 1) / 2)
    np.testing.assert_allclose(metrics.ssim(x, y), want, atol=1e-5)
    assert 0.2 < want.min() and want.max() < 0.99  # a real difference, not a trivial 1


def test_ssim_valid_equals_dm_pix(photos):
    pix = pytest.importorskip("dm_pix")
    x, y = photos
    import jax
    with jax.enable_x64(True):  # the reference exactly: float32 cancellation in flat regions costs ~1e-5
        want = np.asarray(pix.ssim((x.astype(np.float64) + 1) / 2, (y.astype(np.float64) + 1) / 2))
    got = metrics.ssim(x, y, full_map=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # LaMa's full map differs by its zero-padded borders: visibly on these 96x128 crops.
    assert np.abs(np.asarray(metrics.ssim(x, y)) - want).min() > 1e-3


def test_regions_partition_the_whole_image(photos):
    x, y = photos
    mask = half_mask(len(x), *x.shape[1:3])
    mask[0, :10] = 1.0                                       # unequal areas
    for full_map, domain in ((True, mask), (False, mask[:, 5:-5, 5:-5])):  # dm-pix: where the window fits
        n_hole, n = domain.sum(axis=(1, 2, 3)), domain[0].size
        whole, hole, known = (np.asarray(metrics.ssim(x, y, w, full_map=full_map)) for w in (None, mask, 1 - mask))
        np.testing.assert_allclose(whole, (n_hole * hole + (n - n_hole) * known) / n, rtol=1e-5)
    n_hole, n = mask.sum(axis=(1, 2, 3)), mask[0].size
    mse = lambda w: 10 ** (-np.asarray(metrics.psnr(x, y, w)) / 10)  # noqa: E731
    np.testing.assert_allclose(mse(None), (n_hole * mse(mask) + (n - n_hole) * mse(1 - mask)) / n, rtol=1e-5)


def test_summarized_regions(photos):
    x, y = photos
    mask = half_mask(len(x), *x.shape[1:3])
    mask[1] = 1.0                                            # no known region: left out of the known means
    rng = np.random.default_rng(0)
    lpips = LPIPS({k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in expected_shapes().items()})
    report = metrics.summarize(metrics.per_image(x, y, mask, lpips))
    assert set(report) == {f"{m}/{r}" for m in ("psnr", "ssim") for r in metrics.REGIONS} | {
        "pre_error", "lpips/whole"}
    known = np.array([0, 2, 3])
    np.testing.assert_allclose(report["psnr/known"], np.mean(np.asarray(metrics.psnr(x, y, 1 - mask))[known]), rtol=1e-6)
    np.testing.assert_allclose(report["ssim/whole"], np.mean(metrics.ssim(x, y)), rtol=1e-6)
    np.testing.assert_allclose(report["lpips/whole"], np.mean(lpips(x, y)), rtol=1e-6)
    np.testing.assert_allclose(report["pre_error"], np.mean(metrics.pre_error(x, y, mask)), rtol=1e-6)


def test_bad_shapes_are_named():
    x = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 1\).*\(2, 16, 16, 1\)"):
        metrics.per_image(x, x, np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="equal shape"):
        metrics.psnr(x, x[:1])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[:, :8, :8], x[:, :8, :8])


@pytest.fixture(scope="module")
def pytorch_fid():
    """pytorch-fid's modules (scripts/setup.sh makes torchvision importable beside the CPU torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    return pytorch_fid


def random_fid_inception(pytorch_fid, monkeypatch):
    """pytorch-fid's InceptionV3 and its inner torchvision Inception3, with random weights in
    place of the download: He-scaled convolutions and non-trivial BatchNorm statistics."""
    import torch
    import torchvision
    inner = {}
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: inner.update(net=self))
    torch.manual_seed(0)
    model = pytorch_fid.inception.InceptionV3([3]).eval()
    with torch.no_grad():
        for m in inner["net"].modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model, inner["net"]


@pytest.mark.slow
def test_inception_pool_features_equal_pytorch_fid(pytorch_fid, monkeypatch, tmp_path):
    import torch
    from asymvq_jax import inception
    model, inner = random_fid_inception(pytorch_fid, monkeypatch)
    pth = tmp_path / "pt_inception.pth"
    torch.save(inner.state_dict(), pth)       # the published file's layout: torchvision Inception3 keys
    ours_path = tmp_path / "fid_inception.safetensors"
    assert inception.main(["from-pth", str(pth), "--out", str(ours_path)]) == 0
    ours = inception.load(str(ours_path))

    x = np.random.default_rng(0).uniform(-1, 1, (2, 72, 96, 3)).astype(np.float32)  # resized to 299 inside
    with torch.no_grad():
        want = model(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    got = np.asarray(ours(x))
    assert got.shape == (2, inception.FEATURES) and np.abs(want).mean() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_inception_weight_file_errors(tmp_path):
    from asymvq_jax import inception
    with pytest.raises(FileNotFoundError, match="from-pth"):
        inception.load(str(tmp_path / "none.safetensors"))
    shapes = inception.expected_shapes()
    weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    del weights["Mixed_7c.branch_pool.bn.var"]
    weights["Conv2d_1a_3x3.conv.kernel"] = np.zeros((3, 3, 3, 31), np.float32)
    with pytest.raises(ValueError, match=r"Mixed_7c.branch_pool.bn.var.*Conv2d_1a_3x3.conv.kernel: \(3, 3, 3, 31\)"):
        inception.load(weights)


def test_frechet_distance_and_stats_equal_pytorch_fid(pytorch_fid, tmp_path):
    rng = np.random.default_rng(0)
    dim = 256
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = rng.normal(size=(600, dim)) @ mix
    fake = 0.9 * rng.normal(size=(500, dim)) @ (mix + 0.05 * rng.normal(size=(dim, dim))) + 0.1

    stats = []
    for feats in (real, fake):
        acc = metrics.FeatureStats(dim)
        for chunk in np.array_split(feats.astype(np.float32), 7):  # batches, as eval feeds them
            acc.add(chunk)
        mu, sigma = acc.mean_cov()
        exact = feats.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(mu, exact.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(exact, rowvar=False), rtol=1e-9, atol=1e-12)
        stats.append((mu, sigma))

    want = pytorch_fid.fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    got = metrics.frechet_distance(*stats[0], *stats[1])
    assert want > 1.0 and abs(got - want) <= 1e-3 * want, (got, want)
    assert abs(metrics.frechet_distance(*stats[0], *stats[0])) < 1e-6 * want

    # .npz statistics: ours read by pytorch-fid, and back.
    path = str(tmp_path / "real.npz")
    metrics.save_fid_stats(path, *stats[0])
    mu, sigma = pytorch_fid.fid_score.compute_statistics_of_path(path, None, 1, dim, "cpu")
    np.testing.assert_array_equal(mu, stats[0][0]), np.testing.assert_array_equal(sigma, stats[0][1])
    np.testing.assert_array_equal(metrics.load_fid_stats(path)[1], stats[0][1])
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"bad.npz: not FID statistics, missing \['mu', 'sigma'\]"):
        metrics.load_fid_stats(str(tmp_path / "bad.npz"))
