"""Tests of vitvq.data: sources, preprocessing, determinism, multi-process shares, errors."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vitvq import data
from vitvq.data import sources
from vitvq.errors import ConfigError, DataError

SIZE = 16


def _config(name, **overrides):
    values = dict(
        name=name,
        tfds_name=None,
        data_dir=None,
        path=None,
        train_split="train",
        eval_split="validation",
        num_classes=0,
        shuffle_buffer=1000,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _check_batch(batch, batch_size, size=SIZE, with_mask=False):
    assert set(batch) == ({"image", "label", "mask"} if with_mask else {"image", "label"})
    assert batch["image"].shape == (batch_size, size, size, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    if with_mask:
        assert batch["mask"].shape == (batch_size,) and batch["mask"].dtype == np.float32


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real PNG/JPEG/WebP files cut from two bundled photos, one class subfolder each."""
    root = tmp_path_factory.mktemp("images")
    for label, name in enumerate(("cat", "coffee")):
        photo = sources.load_photo("chelsea" if label == 0 else "coffee")
        (root / name).mkdir()
        for k, ext in enumerate(("png", "png", "jpg", "webp", "png")):
            crop = photo[20 * k : 20 * k + 30 + 7 * k, 15 * k : 15 * k + 45]
            Image.fromarray(crop).save(root / name / f"{k}.{ext}")
    return root


@pytest.fixture
def mock_imagenet():
    """imagenet2012 served by tfds.testing.mock_data (random access via data sources)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        yield _config("tfds", tfds_name="imagenet2012", num_classes=1000)


@pytest.fixture
def config_of(image_folder, mock_imagenet):
    def make(name):
        if name == "folder":
            return _config("folder", path=str(image_folder), num_classes=2)
        if name == "tfds":
            return mock_imagenet
        return _config(name, num_classes=10 if name == "digits" else 0)

    return make


ALL_SOURCES = ["digits", "photos", "synthetic", "folder", "tfds"]


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_batches_shapes_dtypes_ranges(name, config_of):
    config = config_of(name)
    info = data.dataset_info(config)
    batch = next(data.train_batches(config, image_size=SIZE, global_batch_size=6, seed=0))
    _check_batch(batch, 6)
    assert batch["label"].min() >= 0
    assert batch["label"].max() < max(info["num_classes"], 1)
    batches = list(data.eval_batches(config, image_size=SIZE, global_batch_size=8))
    assert len(batches) == -(-info["num_eval"] // 8)
    for batch in batches:
        _check_batch(batch, 8, with_mask=True)
    assert sum(b["mask"].sum() for b in batches) == info["num_eval"]


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_resume_equals_uninterrupted(name, config_of):
    config = config_of(name)
    # Digits: step 187 holds positions 1496..1503, across the epoch boundary at 1500.
    step = 187 if name == "digits" else 3
    kwargs = dict(image_size=SIZE, global_batch_size=8, seed=7)
    full = _take(data.train_batches(config, **kwargs), step + 2)
    resumed = _take(data.train_batches(config, start_step=step, **kwargs), 2)
    for a, b in zip(full[step:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = next(data.train_batches(config, **{**kwargs, "seed": 8}))
    assert not np.array_equal(other_seed["image"], full[0]["image"])


@pytest.mark.parametrize("name", ALL_SOURCES)
def test_process_shares_make_up_the_global_batch(name, config_of):
    config = config_of(name)
    kwargs = dict(image_size=SIZE, global_batch_size=8, seed=3, start_step=2)
    whole = next(data.train_batches(config, **kwargs))
    shares = [
        next(data.train_batches(config, process_index=p, process_count=2, **kwargs))
        for p in range(2)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key])
    if name == "digits":  # no two digits images are equal: the shares are disjoint
        first = {x.tobytes() for x in shares[0]["image"]}
        assert not first & {x.tobytes() for x in shares[1]["image"]}


def test_digits_split_is_fixed_and_disjoint():
    from sklearn.datasets import load_digits

    source = sources.load_digits(SIZE)
    assert (len(source.train), len(source.eval)) == (1500, 297)
    np.testing.assert_array_equal(source.eval.labels, load_digits().target[-297:])
    train = {x.tobytes() for x in source.train.images}
    evaluation = {x.tobytes() for x in source.eval.images}
    assert not train & evaluation
    config = _config("digits")
    batches = list(data.eval_batches(config, image_size=SIZE, global_batch_size=100))
    again = list(data.eval_batches(config, image_size=SIZE, global_batch_size=100))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, load_digits().target[-297:])
    np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
    for batch in _take(
        data.train_batches(config, image_size=SIZE, global_batch_size=64, seed=0), 5
    ):
        assert set(batch["label"]) <= set(range(10))
        images = np.round(batch["image"] * 255).astype(np.uint8)
        assert all(x.tobytes() in train for x in images)  # digits are never flipped


def _found_in(crop: np.ndarray, photo: np.ndarray) -> bool:
    """Whether `crop` (or its mirror) is a sub-array of `photo`."""
    size = crop.shape[0]
    for candidate in (crop, crop[:, ::-1]):
        top_left = photo[: photo.shape[0] - size + 1, : photo.shape[1] - size + 1]
        hits = np.argwhere((top_left == candidate[0, 0]).all(-1))
        far = photo[size - 1 :, size - 1 :][hits[:, 0], hits[:, 1]]
        hits = hits[(far == candidate[-1, -1]).all(-1)]
        if any(np.array_equal(photo[y : y + size, x : x + size], candidate) for y, x in hits):
            return True
    return False


def test_photos_eval_only_from_held_out_photos():
    assert not set(sources.PHOTOS_TRAIN) & set(sources.PHOTOS_EVAL)
    for name in sources.PHOTOS_TRAIN + sources.PHOTOS_EVAL:  # all load offline
        assert sources.load_photo(name).ndim == 3
    source = sources.load_photos(SIZE)
    held_out = {name: sources.load_photo(name) for name in sources.PHOTOS_EVAL}
    crops = sources.photo_eval_crops(SIZE)
    assert {name for name, _, _ in crops} == set(sources.PHOTOS_EVAL)
    batches = list(data.eval_batches(_config("photos"), image_size=SIZE, global_batch_size=128))
    images = np.concatenate([b["image"] for b in batches])
    assert len(images) == len(crops) == sources.PHOTOS_NUM_EVAL
    for image, (name, top, left) in zip(images, crops, strict=True):
        expected = held_out[name][top : top + SIZE, left : left + SIZE]
        np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), expected)
    for photo, name in zip(source.train.images, sources.PHOTOS_TRAIN, strict=True):
        np.testing.assert_array_equal(photo, sources.load_photo(name))
    batch = next(
        data.train_batches(_config("photos"), image_size=SIZE, global_batch_size=8, seed=0)
    )
    for crop in np.round(batch["image"] * 255).astype(np.uint8):
        assert any(_found_in(crop, photo) for photo in source.train.images)


def test_eval_padding_and_mask():
    config = _config("digits")
    whole = list(data.eval_batches(config, image_size=SIZE, global_batch_size=64))
    shares = [
        list(
            data.eval_batches(
                config, image_size=SIZE, global_batch_size=64, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 5  # ceil(297 / 64)
    assert sum(b["mask"].sum() for share in shares for b in share) == 297
    for k, batch in enumerate(whole):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([shares[0][k][key], shares[1][k][key]])
            np.testing.assert_array_equal(joined, batch[key])
    last = whole[-1]
    padding = last["mask"] == 0
    assert padding.sum() == 5 * 64 - 297
    assert not last["image"][padding].any() and not last["label"][padding].any()
    subset = list(
        data.eval_batches(config, image_size=SIZE, global_batch_size=64, num_examples=100)
    )
    assert len(subset) == 2 and subset[-1]["mask"].sum() == 36


def test_tfds_eval_padding(mock_imagenet):
    shares = [
        list(
            data.eval_batches(
                mock_imagenet,
                image_size=SIZE,
                global_batch_size=8,
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 2  # ceil(12 / 8)
    np.testing.assert_array_equal(shares[1][1]["mask"], [0, 0, 0, 0])
    assert not shares[1][1]["image"].any()
    assert sum(b["mask"].sum() for share in shares for b in share) == 12


def test_folder_layout_and_split(image_folder, tmp_path):
    info = data.dataset_info(_config("folder", path=str(image_folder)))
    assert info == {
        "num_train": 9,
        "num_eval": 1,
        "num_classes": 2,
        "class_names": ["cat", "coffee"],
    }
    # Explicit split folders: root/train/<class>, root/validation/<class>.
    for split, count in (("train", 2), ("validation", 1)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(count):
                image = np.full((20 + k, 24, 3), 40 * k, np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{k}.png")
    config = _config("folder", path=str(tmp_path))
    assert data.dataset_info(config) == {
        "num_train": 4,
        "num_eval": 2,
        "num_classes": 2,
        "class_names": ["a", "b"],
    }
    batches = list(data.eval_batches(config, image_size=SIZE, global_batch_size=2))
    np.testing.assert_array_equal(batches[0]["label"], [0, 1])


def test_a_folder_is_listed_once_inside_sources_kept(tmp_path, monkeypatch):
    from vitvq.data import records

    scans = []
    real_scan = records._scan
    monkeypatch.setattr(records, "_scan", lambda *a: scans.append(a[0]) or real_scan(*a))
    for k in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 50 * k, np.uint8)).save(tmp_path / "a" / f"{k}.png")
    config = _config("folder", path=str(tmp_path), eval_fraction=0.3)

    def read_all():
        info = data.dataset_info(config)
        _take(data.train_batches(config, image_size=SIZE, global_batch_size=2, seed=0), 1)
        evaluation = list(data.eval_batches(config, image_size=SIZE, global_batch_size=2))
        return info["num_train"] + info["num_eval"], sum(int(b["mask"].sum()) for b in evaluation)

    with data.sources_kept():
        assert read_all()[0] == 3 and len(scans) == 1
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a" / "3.png")
        with data.sources_kept():  # nested: still the outer block's listing
            assert read_all()[0] == 3
        assert read_all()[0] == 3 and len(scans) == 1
    # Outside the block every call lists the folder again and sees the new file.
    total, evaluated = read_all()
    assert total == 4 and len(scans) == 4
    with data.sources_kept():
        assert read_all() == (total, evaluated) and len(scans) == 5


def test_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=str(missing)):
        data.dataset_info(_config("folder", path=str(missing)))
    with pytest.raises(DataError, match=str(tmp_path)):
        data.train_batches(
            _config("folder", path=str(tmp_path)), image_size=SIZE, global_batch_size=2, seed=0
        )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"this is not a png")
    (bad / "b.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("ignored")
    with pytest.raises(DataError, match=r"bad[/\\][ab]\.(png|jpg)"):
        next(
            data.train_batches(
                _config("folder", path=str(bad)), image_size=SIZE, global_batch_size=2, seed=0
            )
        )


def test_config_errors():
    with pytest.raises(ConfigError, match="digits.*photos.*folder.*tfds.*synthetic"):
        data.train_batches(_config("mnist"), image_size=SIZE, global_batch_size=4, seed=0)
    with pytest.raises(ConfigError, match=r"batch_size=10.*\(3\)"):
        data.train_batches(
            _config("digits"), image_size=SIZE, global_batch_size=10, seed=0, process_count=3
        )
    with pytest.raises(ConfigError, match="10"):
        data.eval_batches(_config("digits"), image_size=SIZE, global_batch_size=10, process_count=4)
    with pytest.raises(ConfigError, match="num_classes=5"):
        data.dataset_info(_config("digits", num_classes=5))
    with pytest.raises(ConfigError, match="path"):
        data.dataset_info(_config("folder"))


def test_tfds_not_prepared(tmp_path):
    config = _config("tfds", tfds_name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="tfds build imagenet2012.*manual_dir"):
        data.dataset_info(config)


def test_in_memory_sources_do_not_import_tensorflow():
    script = textwrap.dedent(
        """
        import sys
        import ml_collections
        import vitvq.data as data
        for name in ("synthetic", "digits", "photos"):
            config = ml_collections.ConfigDict(dict(name=name, num_classes=0))
            batch = next(data.train_batches(config, image_size=8, global_batch_size=4, seed=0))
            assert batch["image"].shape == (4, 8, 8, 3), batch["image"].shape
            next(data.eval_batches(config, image_size=8, global_batch_size=4))
            data.dataset_info(config)
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        assert "tensorflow_datasets" not in sys.modules
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name, scale", [("photos", (0.2, 1.0)), ("digits", (0.85, 1.0))])
def test_crop_scale_gives_random_square_crops_resized_and_resumes(name, scale):
    """The photos recipe's crops, and the demo VIM's zoomed digits: the same for a seed,
    resumed exactly, other for another seed, unlike the plain batches; labels unchanged."""
    from vitvq.errors import ConfigError

    cfg = ml_collections.ConfigDict({"name": name, "crop_scale": scale})
    kwargs = dict(image_size=32, global_batch_size=4)
    straight = data.train_batches(cfg, seed=3, **kwargs)
    batches = [next(straight) for _ in range(3)]
    assert batches[0]["image"].shape == (4, 32, 32, 3)
    again = next(data.train_batches(cfg, seed=3, **kwargs))
    np.testing.assert_array_equal(again["image"], batches[0]["image"])
    resumed = next(data.train_batches(cfg, seed=3, start_step=2, **kwargs))
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    other = next(data.train_batches(cfg, seed=4, **kwargs))
    assert not np.array_equal(other["image"], batches[0]["image"])
    # The same examples as without crop_scale, drawn otherwise (for photos: whole-photo-scale
    # crops are smoother than native-resolution crops of the same photos).
    native = ml_collections.ConfigDict({"name": name})
    plain = next(data.train_batches(native, seed=3, **kwargs))
    np.testing.assert_array_equal(plain["label"], batches[0]["label"])
    assert not np.array_equal(plain["image"], batches[0]["image"])
    for bad in [(0.0, 0.5), (0.6, 0.5), (0.5, 1.5), "big"]:
        with pytest.raises(ConfigError, match="crop_scale"):
            data.train_batches(
                ml_collections.ConfigDict({"name": "photos", "crop_scale": bad}),
                image_size=32,
                global_batch_size=4,
                seed=0,
            )
