"""Input pipeline: determinism/resume, per-host sharding, bad files, sources."""

import logging
import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from asymvq_jax.data import (
    BUNDLED_PHOTOS,
    HELD_OUT_PHOTOS,
    TRAIN_PHOTOS,
    BundledPhotos,
    batch_for_step,
    held_out_batch,
    decode_rgb,
    list_images,
    make_train_iterator,
)
from tests.conftest import sample_photos_dir

SIZE = 32


def _cfg(path, batch_size=4, seed=0, image_size=SIZE, **data):
    d = dict(source="folder", path=str(path), name=None, split="train", data_dir=None,
             mask="thick_256", all_ones_prob=0.5, num_workers=2)
    d.update(data)
    return ConfigDict(dict(seed=seed, batch_size=batch_size, image_size=image_size, data=d))


def _take(it, n):
    with it:
        return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(10):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = d / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        ext = [".png", ".JPG", ".jpeg", ".webp"][i % 4]
        Image.fromarray(arr).save(sub / f"img{i}{ext}", quality=95)
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def solid_dir(tmp_path_factory):
    """16 solid-colour images: the red value 10*i identifies file i after any crop."""
    d = tmp_path_factory.mktemp("solid")
    for i in range(16):
        Image.new("RGB", (48 + i, 40), (10 * i, 128, 200)).save(d / f"s{i:02d}.png")
    return d


def test_listing_is_recursive_and_case_insensitive(noise_dir):
    files = list_images(noise_dir)
    assert len(files) == 10 and files == sorted(files)
    assert any(f.endswith(".JPG") for f in files) and any(f.endswith(".webp") for f in files)


def test_batch_format(noise_dir):
    (b,) = _take(make_train_iterator(_cfg(noise_dir), process_index=0, process_count=1), 1)
    assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (4, SIZE, SIZE, 1) and b["mask"].dtype == np.float32
    assert -1.0 <= b["image"].min() < -0.9 and 0.9 < b["image"].max() <= 1.0
    assert set(np.unique(b["mask"])) <= {0.0, 1.0}


def test_resume_gives_identical_batches(noise_dir):
    cfg = _cfg(noise_dir)
    full = _take(make_train_iterator(cfg, process_index=0, process_count=1), 7)
    resumed = _take(make_train_iterator(cfg, start_step=4, process_index=0, process_count=1), 3)
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    # Without background threads, the same again.
    direct = batch_for_step(cfg, 5, process_index=0, process_count=1)
    np.testing.assert_array_equal(direct["image"], full[5]["image"])
    # Steps differ from each other, and another seed gives other batches.
    assert not np.array_equal(full[0]["image"], full[1]["image"])
    other = batch_for_step(_cfg(noise_dir, seed=1), 4, process_index=0, process_count=1)
    assert not np.array_equal(other["image"], full[4]["image"])


def test_hosts_read_disjoint_parts_of_the_global_batch(noise_dir):
    cfg = _cfg(noise_dir, batch_size=6)
    whole = batch_for_step(cfg, 3, process_index=0, process_count=1)
    parts = [batch_for_step(cfg, 3, process_index=p, process_count=3) for p in range(3)]
    assert all(p["image"].shape[0] == 2 for p in parts)
    for key in ("image", "mask"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert not np.array_equal(parts[0]["image"], parts[1]["image"])
    with pytest.raises(ValueError, match="not divisible"):
        make_train_iterator(_cfg(noise_dir, batch_size=5), process_index=0, process_count=2)


def _moves(img, ref, turns):
    """The (mirror, quarter turns) that take `ref` to `img`."""
    return [(m, k) for m in (0, 1) for k in turns if np.array_equal(img, np.rot90(ref[:, ::-1] if m else ref, k))]


def test_flips_move_each_crop_and_leave_the_masks(noise_dir):
    plain = [batch_for_step(_cfg(noise_dir), s, process_index=0, process_count=1) for s in range(4)]
    # How many distinct moves 16 crops show: "h" both sides, "dihedral" at least 5 of its 8 symmetries
    # (all but certainly)
    for flips, turns, counts in (("none", [0], {1}), ("h", [0], {2}), ("dihedral", range(4), range(5, 9))):
        seen = set()
        for s, p in enumerate(plain):
            b = batch_for_step(_cfg(noise_dir, flips=flips), s, process_index=0, process_count=1)
            np.testing.assert_array_equal(b["mask"], p["mask"])
            for img, ref in zip(b["image"], p["image"]):
                moves = _moves(img, ref, turns)
                assert moves, f"flips={flips}: an image that is not its crop mirrored or turned as allowed"
                seen.add(moves[0])
        assert len(seen) in counts, (flips, seen)
    with pytest.raises(ValueError, match="flips"):
        make_train_iterator(_cfg(noise_dir, flips="v"), process_index=0, process_count=1)


def test_colour_gain_scales_each_channel_of_each_crop_within_its_range(noise_dir):
    gain, gains = 0.5, []
    for s in range(3):
        ref = batch_for_step(_cfg(noise_dir), s, process_index=0, process_count=1)
        b = batch_for_step(_cfg(noise_dir, colour_gain=gain), s, process_index=0, process_count=1)
        np.testing.assert_array_equal(b["mask"], ref["mask"])
        for img, r in zip(b["image"], ref["image"]):
            for c in range(3):
                x, y = r[..., c] + 1.0, img[..., c] + 1.0   # brightness on [0, 2]
                ok = (x > 0.2) & (y < 1.99)                    # neither dark nor clipped
                g = y[ok] / x[ok]
                # One gain per channel of each crop, clipped only at the top
                np.testing.assert_allclose(g, np.median(g), rtol=1e-4)
                np.testing.assert_allclose(y, np.minimum(x * np.median(g), 2.0), atol=1e-5)
                gains.append(float(np.median(g)))
    gains = np.array(gains)
    assert gains.min() >= 1 - gain - 1e-4 and gains.max() <= 1 + gain + 1e-4, gains
    # 36 draws from U(0.5, 1.5) span most of the range
    assert gains.min() < 0.7 and gains.max() > 1.3, gains
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="colour_gain"):
            make_train_iterator(_cfg(noise_dir, colour_gain=bad), process_index=0, process_count=1)


def test_each_epoch_visits_every_file_once(solid_dir):
    cfg = _cfg(solid_dir, batch_size=8)
    ids = []
    for step in range(4):  # 2 epochs of 16 files
        for p in range(2):
            b = batch_for_step(cfg, step, process_index=p, process_count=2)
            red = (b["image"][..., 0].mean(axis=(1, 2)) + 1) * 127.5
            ids += list(np.rint(red / 10).astype(int))
    assert sorted(ids[:16]) == list(range(16))
    assert sorted(ids[16:]) == list(range(16))
    assert ids[:16] != ids[16:]  # reshuffled per epoch


def _write_bad_files(d):
    rng = np.random.default_rng(1)
    good = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(d / "good.png")
    full = d / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(full, quality=95)
    data = full.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    full.unlink()
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(
        d / "sixteen.png")
    rgba = np.zeros((50, 50, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:25, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(good[..., 0], "L").save(d / "gray.jpg")
    Image.fromarray(good).convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    Image.fromarray(good[:10, :10]).save(d / "tiny.png")


def test_bad_and_unusual_files_are_converted_or_skipped_and_counted(tmp_path, caplog):
    _write_bad_files(tmp_path)
    cfg = _cfg(tmp_path, batch_size=4)
    caplog.set_level(logging.INFO, logger="asymvq_jax.data")
    it = make_train_iterator(cfg, process_index=0, process_count=1)
    batches = _take(it, 12)  # 48 examples over 9 files: every file is tried
    for b in batches:
        assert np.isfinite(b["image"]).all() and b["image"].shape == (4, SIZE, SIZE, 3)
    assert it.stats["skipped"] == 2  # truncated.jpg, garbage.png
    assert it.stats["converted"] == 4  # sixteen (I;16), rgba, gray, palette
    assert it.stats["upsampled"] >= 1  # at least tiny.png (10x10 -> 32x32)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("truncated.jpg" in m for m in warned)
    assert any("2 skipped so far" in m for m in warned)
    # Deterministic despite skips: a resumed run sees the same batches.
    again = _take(make_train_iterator(cfg, start_step=9, process_index=0, process_count=1), 3)
    for a, b in zip(batches[9:], again):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_decode_conversions(tmp_path):
    _write_bad_files(tmp_path)
    a, note = decode_rgb(tmp_path / "rgba.png")
    assert note and (a[:25] == [255, 0, 0]).all() and (a[25:] == 255).all()  # on white
    a, note = decode_rgb(tmp_path / "sixteen.png")
    src = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    np.testing.assert_array_equal(a[..., 1], np.rint(src / 257.0).astype(np.uint8))
    assert a.max() > 200  # 16-bit range mapped, not clipped to 255 everywhere
    a, note = decode_rgb((tmp_path / "gray.jpg").read_bytes())
    assert a.shape == (64, 64, 3) and note
    a, note = decode_rgb(tmp_path / "good.png")
    assert note is None


def test_empty_or_missing_folder_fails_clearly(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        make_train_iterator(_cfg(missing), process_index=0, process_count=1)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*contains no images"):
        make_train_iterator(_cfg(tmp_path / "empty"), process_index=0, process_count=1)
    (tmp_path / "broken").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "broken" / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken: none of the first 2 images can be read \(e.g. .*a.png: "):
        make_train_iterator(_cfg(tmp_path / "broken"), process_index=0, process_count=1)


def test_a_one_pixel_image_is_upsampled_and_counted(tmp_path, caplog):
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    caplog.set_level(logging.INFO, logger="asymvq_jax.data")
    it = make_train_iterator(_cfg(tmp_path), process_index=0, process_count=1, background=False)
    batch = next(it)
    assert it.stats["upsampled"] == 1 and np.allclose(batch["image"], 200 / 127.5 - 1)
    assert any(r.getMessage().startswith("upsampled image") and "dot.png (1x1" in r.getMessage()
               and "1 upsampled so far" in r.getMessage() for r in caplog.records)


def test_sample_photos_dir_writes_the_training_photos(tmp_path):
    d = sample_photos_dir(tmp_path / "photos")
    assert [os.path.basename(f) for f in list_images(d)] == sorted(f"{n}.png" for n in TRAIN_PHOTOS)
    arr, _ = decode_rgb(os.path.join(d, "astronaut.png"))
    assert arr.shape == (512, 512, 3) and arr.std() > 20  # a real photo, not a blank
    (b,) = _take(make_train_iterator(_cfg(d, batch_size=2, image_size=64),
                                     process_index=0, process_count=1), 1)
    assert b["image"].shape == (2, 64, 64, 3)


def test_bundled_photos_are_declared_and_never_train_on_the_held_out_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # nothing may land in a cache shared by other environments
    assert set(TRAIN_PHOTOS) | set(HELD_OUT_PHOTOS) == set(BUNDLED_PHOTOS)
    assert not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)
    source = BundledPhotos()
    assert [source.get(i)[1] for i in range(len(source))] == list(TRAIN_PHOTOS)
    assert all(source.get(i)[0].shape[-1] == 3 and source.get(i)[0].dtype == np.uint8 for i in range(len(source)))
    # The photos from scikit-learn's and matplotlib's wheels are real colour photos, found without a download.
    from asymvq_jax.data.folder import WHEEL_PHOTOS
    for name in WHEEL_PHOTOS:
        img = source.get(TRAIN_PHOTOS.index(name))[0].astype(np.float32)
        assert min(img.shape[:2]) >= 400 and img.std() > 20, (name, img.shape)
        assert np.abs(img - img.mean(-1, keepdims=True)).mean() > 5, name  # not grey

    cfg = _cfg(None, batch_size=len(TRAIN_PHOTOS), source="bundled_photos")
    first, again = batch_for_step(cfg, 5), batch_for_step(cfg, 5)
    np.testing.assert_array_equal(first["image"], again["image"])
    held, held_again = held_out_batch(cfg, 6), held_out_batch(cfg, 6)
    np.testing.assert_array_equal(held["image"], held_again["image"])
    np.testing.assert_array_equal(held["mask"], held_again["mask"])
    assert all(0 < m.mean() < 1 for m in held["mask"])  # every held-out example has a hole and a known region
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ TFDS
_BUILDER = {}
N_TFDS = 24


def _builder_cls():
    """Defined (and registered with TFDS) once per session."""
    if "cls" in _BUILDER:
        return _BUILDER["cls"]
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    n = N_TFDS

    class AsymvqTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(shape=(None, None, 3)),
                     "label": tfds.features.ClassLabel(num_classes=n)}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(n):
                img = np.zeros((40, 48, 3), np.uint8)
                img[..., 0] = 10 * i
                yield i, {"image": img, "label": i}

    _BUILDER["cls"] = AsymvqTinyImages
    return AsymvqTinyImages


def _tiny_tfds(data_dir, file_format=None):
    cls = _builder_cls()
    kw = {"file_format": file_format} if file_format else {}
    b = cls(data_dir=str(data_dir), **kw)
    b.download_and_prepare()
    return "asymvq_tiny_images"


def _ids(batch):
    red = (batch["image"][..., 0].mean(axis=(1, 2)) + 1) * 127.5
    return list(np.rint(red / 10).astype(int))


@pytest.mark.parametrize("file_format", [None, "array_record"])
def test_tfds_source_resume_and_hosts(tmp_path, file_format):
    if file_format == "array_record":
        pytest.importorskip("array_record")
    name = _tiny_tfds(tmp_path, file_format)
    cfg = _cfg(None, batch_size=4, source="tfds", name=name, split="train",
               data_dir=str(tmp_path), shuffle_buffer=8)
    full = [_take(make_train_iterator(cfg, process_index=p, process_count=2), 8)
            for p in range(2)]
    # 8 steps x 4 = 32 examples > 24: crosses an epoch boundary on every host.
    resumed = _take(make_train_iterator(cfg, start_step=5, process_index=1, process_count=2), 3)
    for a, b in zip(full[1][5:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    first_epoch = []
    for step in range(6):  # 6 steps x 4 = 24 = one epoch over both hosts
        first_epoch += _ids(full[0][step]) + _ids(full[1][step])
    assert sorted(first_epoch) == list(range(24))
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        make_train_iterator(_cfg(None, source="tfds", name="no_such_dataset_xyz",
                                 data_dir=str(tmp_path)), process_index=0, process_count=1)
