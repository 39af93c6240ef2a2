"""FID / Inception Score: statistics against float64 references, the FID InceptionV3 module, the
torch-free PyTorch file reader (both formats, written here without torch) and the converter."""

import collections
import importlib.util
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from inception_helpers import random_inception_params

from vitvq import errors
from vitvq.evaluation import fid, torch_reader
from vitvq.models import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# Frechet distance, feature statistics, Inception Score.


def _reference_frechet(mu1, s1, mu2, s2):
    """Independent float64 reference: tr(sqrtm(s1 s2)) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1)))."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


def _gaussian_features(rng, n, d, shift):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift * rng.normal(size=d)


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    a = _gaussian_features(rng, 2000, 64, 1.0)
    b = _gaussian_features(rng, 2000, 64, 2.0)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    expected = _reference_frechet(*stats[0], *stats[1])
    got = fid.frechet_distance(*stats[0], *stats[1])
    assert isinstance(got, float) and expected > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(fid.fid_from_features(a, b), expected, rtol=1e-6)
    # float32 inputs are promoted: same answer to float32 input precision.
    f32 = [(m.astype(np.float32), s.astype(np.float32)) for m, s in stats]
    np.testing.assert_allclose(fid.frechet_distance(*f32[0], *f32[1]), expected, rtol=1e-4)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = _gaussian_features(np.random.default_rng(1), 2000, 64, 1.0)
    assert abs(fid.fid_from_features(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_frechet_distance_isotropic_closed_form():
    d = 32
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = 1.5, 0.4  # standard deviations
    expected = d * 0.5**2 + d * (s1 - s2) ** 2
    got = fid.frechet_distance(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.3  # rank 19 covariances
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    got = fid.frechet_distance(*stats[0], *stats[1])
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _reference_frechet(*stats[0], *stats[1]), rtol=1e-3)


def test_frechet_distance_retries_with_offset_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(6)
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in rng.normal(size=(2, 500, 16))]
    calls, sqrtm = [], fid._sqrtm

    def failing_once(matrix):  # as scipy's sqrtm gives inf for some singular products
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(fid, "_sqrtm", failing_once)
    got = fid.frechet_distance(*stats[0], *stats[1], eps=1e-6)
    assert len(calls) == 2 and not np.array_equal(calls[0], calls[1])
    np.testing.assert_allclose(got, _reference_frechet(*stats[0], *stats[1]), rtol=1e-4)
    # The zero covariance (a singular product) needs no retry: N(0, 0) vs N(1, I) in 8-d.
    monkeypatch.setattr(fid, "_sqrtm", sqrtm)
    assert fid.frechet_distance(
        np.zeros(8), np.zeros((8, 8)), np.ones(8), np.eye(8)
    ) == pytest.approx(16.0)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(errors.InputError, match="imaginary"):
        fid.frechet_distance(np.zeros(4), -np.eye(4), np.zeros(4), np.eye(4))
    with pytest.raises(errors.InputError, match="shape"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


def test_feature_stats_streams_uneven_batches():
    rng = np.random.default_rng(3)
    x = _gaussian_features(rng, 1000, 16, 5.0).astype(np.float32)
    stats = fid.FeatureStats()
    start = 0
    for size in (1, 7, 0, 300, 2, 690):
        stats.update(x[start : start + size])
        start += size
    assert stats.count == 1000
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(x64, rowvar=False, ddof=1), rtol=1e-10)
    # Merging two halves gives the same statistics.
    merged = fid.FeatureStats().update(x[:123]).merge(fid.FeatureStats().update(x[123:]))
    np.testing.assert_allclose(merged.covariance, stats.covariance, rtol=1e-10)
    with pytest.raises(errors.InputError, match="16"):
        stats.update(np.zeros((3, 8)))
    with pytest.raises(errors.InputError, match="at least 2"):
        _ = fid.FeatureStats().update(x[:1]).covariance


def test_inception_score():
    k, splits = 10, 5
    uniform = np.full((100, k), 1.0 / k)
    assert fid.inception_score(uniform, splits=splits) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert fid.inception_score(np.zeros((100, k)), splits) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = np.tile(np.eye(k), (splits, 1))  # every split holds every class once
    mean, std = fid.inception_score(one_hot, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = fid.inception_score(50.0 * one_hot, splits=splits)  # confident logits
    assert mean == pytest.approx(k, rel=1e-6)
    with pytest.raises(errors.InputError, match="splits"):
        fid.inception_score(uniform[:3], splits=10)


# --------------------------------------------------------------------------------------------
# Writing PyTorch files without torch: a fake `torch` whose globals pickle under torch's names.


class _FakeStorage:
    def __init__(self, data: np.ndarray):
        self.data = np.ascontiguousarray(data).reshape(-1)


class _FakeTensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, grad, hooks)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        hooks = collections.OrderedDict()
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, hooks)


def _tensor(array) -> _FakeTensor:
    array = np.asarray(array)
    strides = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    return _FakeTensor(_FakeStorage(array), 0, array.shape, strides)


_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


@pytest.fixture
def fake_torch(monkeypatch):
    """Registers stand-ins for torch, torch._utils and the storage classes (this test only)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _TorchPickler(pickle.Pickler):
    """Emits storages as torch's persistent ids and remembers them for the data section."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: dict[str, _FakeStorage] = {}
        self._keys: dict[int, str] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, _FakeStorage):
            return None
        key = self._keys.setdefault(id(obj), str(len(self._keys)))
        self.storages[key] = obj
        cls = getattr(sys.modules["torch"], _STORAGE_NAMES[obj.data.dtype])
        pid = ("storage", cls, key, "cpu", obj.data.size)
        return pid + (None,) if self.legacy else pid


def _write_torch_file(path, obj, legacy: bool) -> None:
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer, legacy)
    pickler.dump(obj)
    storages = pickler.storages
    if not legacy:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("archive/data.pkl", buffer.getvalue())
            zf.writestr("archive/byteorder", "little")
            zf.writestr("archive/version", "3\n")
            for key, storage in storages.items():
                zf.writestr(f"archive/data/{key}", storage.data.tobytes())
        return
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
        pickle.dump(sys_info, f, protocol=2)
        f.write(buffer.getvalue())
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(struct.pack("<q", storages[key].data.size))
            f.write(storages[key].data.tobytes())


# --------------------------------------------------------------------------------------------
# The reader.


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_reader_reads_both_formats(fake_torch, tmp_path, legacy):
    rng = np.random.default_rng(4)
    dense = rng.normal(size=(3, 4)).astype(np.float32)
    shared = _FakeStorage(np.arange(20, dtype=np.float64))
    base = shared.data
    state = collections.OrderedDict(
        dense=_tensor(dense),
        transposed=_FakeTensor(_FakeStorage(dense), 0, (4, 3), (1, 4)),  # dense.T
        offset=_FakeTensor(shared, 5, (2, 3), (4, 1)),  # rows of 3 every 4 from element 5
        strided=_FakeTensor(shared, 1, (3,), (6,)),  # same storage, elements 1, 7, 13
        count=_tensor(np.array(7, np.int64)),  # 0-d, like num_batches_tracked
        half=_tensor(rng.normal(size=5).astype(np.float16)),
        mask=_tensor(np.array([True, False, True])),
        empty=_tensor(np.zeros((0, 2), np.float32)),
    )
    path = tmp_path / ("legacy.pth" if legacy else "zip.pth")
    _write_torch_file(path, state, legacy)
    out = torch_reader.load_torch_state_dict(path)
    expected = {
        "dense": dense,
        "transposed": dense.T,
        "offset": np.stack([base[5:8], base[9:12]]),
        "strided": base[[1, 7, 13]],
        "count": np.array(7, np.int64),
        "half": state["half"].storage.data,
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 2), np.float32),
    }
    assert list(out) == list(expected)
    for name, want in expected.items():
        assert out[name].dtype == want.dtype and out[name].shape == want.shape, name
        np.testing.assert_array_equal(out[name], want, err_msg=name)
    # Nested containers come back as they were.
    _write_torch_file(path, {"model": [_tensor(dense), (1, "a")]}, legacy)
    nested = torch_reader.load_torch_file(path)
    np.testing.assert_array_equal(nested["model"][0], dense)
    assert nested["model"][1] == (1, "a")


def test_torch_reader_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system("touch ...")
    zipped = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
    for path in (zipped, legacy):
        with pytest.raises(errors.BundleError, match=r"os\.system"):
            torch_reader.load_torch_file(path)
    assert not marker.exists()


def test_torch_reader_rejects_bad_files(fake_torch, tmp_path):
    with pytest.raises(errors.BundleError, match="nowhere.pth"):
        torch_reader.load_torch_file(tmp_path / "nowhere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pytorch file at all")
    with pytest.raises(errors.BundleError, match="not a PyTorch file"):
        torch_reader.load_torch_file(junk)
    past_end = tmp_path / "past_end.pth"
    _write_torch_file(past_end, {"x": _FakeTensor(_FakeStorage(np.zeros(4)), 2, (3,), (1,))}, False)
    with pytest.raises(errors.BundleError, match="past the end"):
        torch_reader.load_torch_file(past_end)
    not_a_dict = tmp_path / "list.pth"
    _write_torch_file(not_a_dict, [_tensor(np.zeros(2))], True)
    with pytest.raises(errors.BundleError, match="state_dict"):
        torch_reader.load_torch_state_dict(not_a_dict)


# --------------------------------------------------------------------------------------------
# The InceptionV3 module, the converter and the loader.


@pytest.fixture(scope="module")
def direct():
    """Random weights, two 64x64 uint8 images and the module applied to them directly."""
    flat = random_inception_params()
    images = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    apply = jax.jit(inception.InceptionV3().apply)
    outputs = apply({"params": inception.unflatten_params(flat)}, images)
    return flat, images, jax.device_get(outputs)


def test_inception_param_tree_matches_converter_layout():
    model = inception.InceptionV3()
    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    flat = {k: tuple(v.shape) for k, v in inception.flatten_params(shapes).items()}
    assert flat == inception.flax_param_shapes()
    assert "Conv2d_1a_3x3/conv/kernel" in flat and "Mixed_7c/branch_pool/bn/var" in flat
    assert flat["fc/kernel"] == (2048, 1008)
    # 23.9M parameters, as the FID InceptionV3 (no auxiliary classifier).
    assert sum(np.prod(s) for s in flat.values()) == 23_885_392
    torch_shapes = inception.torch_state_dict_shapes()
    assert torch_shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert torch_shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)


def test_inception_forward_shapes(direct):
    _, _, outputs = direct
    assert outputs["pool"].shape == (2, 2048) and outputs["pool"].dtype == np.float32
    assert outputs["logits"].shape == (2, 1008)
    assert np.isfinite(outputs["pool"]).all() and np.isfinite(outputs["logits"]).all()
    assert (outputs["pool"] >= 0).all() and outputs["pool"].std() > 1e-3  # after ReLU, not dead
    assert not np.allclose(outputs["pool"][0], outputs["pool"][1])


def _load_script():
    path = os.path.join(REPO, "scripts", "convert_inception_weights.py")
    spec = importlib.util.spec_from_file_location("convert_inception_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_end_to_end(fake_torch, direct, tmp_path, capsys):
    flat, images, expected = direct
    state = collections.OrderedDict()
    for name, value in inception.params_to_torch_state_dict(flat).items():
        state[name] = _tensor(value)
        if name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = _tensor(np.array(0))
    source, output = tmp_path / "pt_inception.pth", tmp_path / "inception_fid.safetensors"
    _write_torch_file(source, state, legacy=True)
    script = _load_script()
    assert script.main([f"--input={source}", f"--output={output}"]) == 0
    assert "472 tensors" in capsys.readouterr().out
    stored = safetensors.numpy.load_file(output)
    assert stored.keys() == flat.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    features = fid.load_inception(output)
    got = features(images)
    for key in ("pool", "logits"):
        np.testing.assert_allclose(np.asarray(got[key]), expected[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(errors.InputError, match="B, H, W, 3"):
        features(images[..., :1])


def test_converter_reports_missing_and_misshapen_tensors(fake_torch, tmp_path, capsys):
    state = {
        "Conv2d_1a_3x3.conv.weight": _tensor(np.zeros((32, 3, 5, 5), np.float32)),
        "fc.bias": _tensor(np.zeros(1008, np.float32)),
        "AuxLogits.fc.bias": _tensor(np.zeros(1000, np.float32)),
    }
    source = tmp_path / "partial.pth"
    _write_torch_file(source, state, legacy=False)
    code = _load_script().main([f"--input={source}", f"--output={tmp_path / 'out.st'}"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out.st").exists()
    assert "partial.pth" in err and "missing" in err
    assert "Conv2d_2a_3x3.conv.weight (32, 32, 3, 3)" in err
    assert "unexpected" in err and "AuxLogits.fc.bias" in err
    assert "Conv2d_1a_3x3.conv.weight is (32, 3, 5, 5), expected (32, 3, 3, 3)" in err


def test_load_inception_errors(tmp_path):
    missing = tmp_path / "no_such_weights.safetensors"
    with pytest.raises(errors.BundleError, match="no_such_weights.safetensors") as info:
        fid.load_inception(missing)
    assert "convert_inception_weights.py" in str(info.value)
    assert "convert_inception_weights.py" in fid.FID_WEIGHTS_HELP
    wrong = tmp_path / "wrong.safetensors"
    safetensors.numpy.save_file({"fc/kernel": np.zeros((3, 3), np.float32)}, wrong)
    with pytest.raises(errors.BundleError) as info:
        fid.load_inception(wrong)
    message = str(info.value)
    assert "wrong.safetensors" in message and "Conv2d_1a_3x3/conv/kernel (3, 3, 3, 32)" in message
    assert "fc/kernel is (3, 3), expected (2048, 1008)" in message
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"junk")
    with pytest.raises(errors.BundleError, match="safetensors"):
        fid.load_inception(not_safetensors)
