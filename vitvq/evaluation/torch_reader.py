"""Reads PyTorch `torch.save` files (state_dicts of tensors) into numpy, without torch.

Both of torch's layouts are understood:

* zip (torch >= 1.6): `<dir>/data.pkl` holds the object pickle; each storage is the raw bytes
  of `<dir>/data/<key>`; `<dir>/byteorder` (optional) says "little" or "big".
* legacy (`_use_new_zipfile_serialization=False`, and every file before 1.6): five things in
  sequence, a pickle of the magic number, one of the protocol version (1001), one of the sys
  info dict, the object pickle, one of the sorted storage keys, then for each key an 8-byte
  little-endian element count followed by the storage's raw bytes.

In both, the object pickle refers to storages by persistent id
`("storage", storage_class, key, location, numel[, view_metadata])` and rebuilds tensors with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

The unpickler is restricted: `find_class` resolves only `collections.OrderedDict`, the tensor
rebuild functions (mapped to numpy builders that honor storage offset, size and stride) and the
storage classes (mapped to dtypes). Any other global, e.g. `os.system`, raises `BundleError`
naming it, so a crafted file cannot run code.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from vitvq import errors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    # torch >= 1.13 untyped storages: bytes.
    "UntypedStorage": np.uint8,
    "_UntypedStorage": np.uint8,
}
# Modules a storage class may be pickled from: torch.FloatStorage, torch.storage.UntypedStorage,
# torch.cuda.FloatStorage (very old files saved from the GPU).
_STORAGE_MODULES = ("torch", "torch.storage", "torch.cuda")


class _StorageType:
    """What a storage class becomes here: just its element dtype (and not callable)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: Any):
        self.name = name
        self.dtype = np.dtype(dtype)


class _Storage:
    """A storage referenced by the object pickle; `data` is filled in once its bytes are read."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _StorageView:
    """A legacy view into a root storage: elements [offset, offset + size)."""

    __slots__ = ("root", "offset", "size")

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size


class _Tensor:
    """A tensor to build from its storage after every storage has been read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _Tensor:
    """Stands in for torch._utils._rebuild_tensor(_v2); extra args (grad, hooks) are ignored."""
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    """Stands in for torch._utils._rebuild_parameter: a Parameter is its tensor."""
    return data


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for `_codecs.encode`, which protocol-2 pickles use to write bytes."""
    return text.encode(encoding)


_ALLOWED_FUNCTIONS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only OrderedDict, tensor rebuilds and storage classes; refuses everything else."""

    def __init__(self, file, path: str, storages: dict[str, _Storage]):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise errors.BundleError(
            f"{self._path}: refusing to load {module}.{name} from the pickle; a PyTorch weight "
            "file may only contain tensors, storages and OrderedDicts (is this the right file?)."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise errors.BundleError(f"{self._path}: unsupported persistent id {pid!r}.")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        storage_type, key, _location, numel = pid[1:5]
        if typename != "storage" or not isinstance(storage_type, _StorageType):
            raise errors.BundleError(f"{self._path}: unsupported persistent id {pid!r}.")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy views: (view_key, offset, size) into the root storage
            _view_key, offset, size = view
            return _StorageView(storage, int(offset), int(size))
        return storage


def _unpickle(file, path: str, storages: dict[str, _Storage]) -> Any:
    try:
        return _RestrictedUnpickler(file, path, storages).load()
    except errors.VitvqError:
        raise
    except Exception as e:  # a truncated or corrupt pickle, or a refused REDUCE
        raise errors.BundleError(
            f"{path}: cannot read the PyTorch pickle ({type(e).__name__}: {e})."
        ) from e


def _fill(storage: _Storage, raw: bytes, byteorder: str, path: str) -> None:
    nbytes = storage.numel * storage.dtype.itemsize
    if len(raw) < nbytes:
        raise errors.BundleError(
            f"{path}: storage {storage.key} has {len(raw)} bytes, expected {nbytes} "
            f"({storage.numel} x {storage.dtype}); the file is truncated or corrupt."
        )
    dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
    data = np.frombuffer(raw, dtype=dtype, count=storage.numel)
    storage.data = data.astype(storage.dtype.newbyteorder("="), copy=True)


def _read_zip(path: str) -> tuple[Any, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise errors.BundleError(
                f"{path}: a zip file but not a torch.save archive (expected one <dir>/data.pkl)."
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in zf.namelist():
            byteorder = zf.read(f"{prefix}byteorder").decode("ascii").strip()
        storages: dict[str, _Storage] = {}
        obj = _unpickle(io.BytesIO(zf.read(pickles[0])), path, storages)
        for key, storage in storages.items():
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise errors.BundleError(
                    f"{path}: storage {prefix}data/{key} is missing from the archive."
                ) from None
            _fill(storage, raw, byteorder, path)
    return obj, storages


def _read_legacy(path: str) -> tuple[Any, dict[str, _Storage]]:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, path, storages).load()
        except errors.VitvqError:
            raise
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            raise errors.BundleError(
                f"{path}: not a PyTorch file (neither a zip archive nor the legacy format's "
                "magic number)."
            )
        version = _unpickle(f, path, storages)
        if version != _LEGACY_PROTOCOL:
            raise errors.BundleError(
                f"{path}: unsupported legacy PyTorch protocol version {version!r} "
                f"(expected {_LEGACY_PROTOCOL})."
            )
        sys_info = _unpickle(f, path, storages)
        little = sys_info.get("little_endian", True) if isinstance(sys_info, Mapping) else True
        obj = _unpickle(f, path, storages)
        keys = _unpickle(f, path, storages)
        if not isinstance(keys, list | tuple):
            raise errors.BundleError(f"{path}: corrupt legacy file (bad storage key list).")
        for key in keys:
            key = key.decode("ascii") if isinstance(key, bytes) else str(key)
            storage = storages.get(key)
            header = f.read(8)
            if storage is None or len(header) != 8:
                raise errors.BundleError(
                    f"{path}: corrupt legacy file (storage {key} is unreferenced or truncated)."
                )
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise errors.BundleError(
                    f"{path}: storage {key} has {numel} elements, its pickle says {storage.numel}."
                )
            _fill(
                storage, f.read(numel * storage.dtype.itemsize), "little" if little else "big", path
            )
    return obj, storages


def _build(tensor: _Tensor, path: str) -> np.ndarray:
    storage, base = tensor.storage, 0
    if isinstance(storage, _StorageView):
        storage, base = storage.root, storage.offset
    if not isinstance(storage, _Storage) or storage.data is None:
        raise errors.BundleError(f"{path}: a tensor refers to a storage that was never read.")
    size, stride, offset = tensor.size, tensor.stride, base + tensor.offset
    data = storage.data
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in (*size, *stride)):
        raise errors.BundleError(
            f"{path}: bad tensor layout (size {size}, stride {stride}, offset {offset})."
        )
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise errors.BundleError(
            f"{path}: a tensor of size {size}, stride {stride} at offset {offset} reads past "
            f"the end of its storage ({data.size} elements)."
        )
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False
    )
    return np.array(view)


def _resolve(obj: Any, path: str) -> Any:
    """Replaces tensors (and bare storages) in dicts, lists and tuples by numpy arrays."""
    if isinstance(obj, _Tensor):
        return _build(obj, path)
    if isinstance(obj, _Storage | _StorageView):
        view = obj if isinstance(obj, _StorageView) else _StorageView(obj, 0, obj.numel)
        return _build(_Tensor(view, 0, (view.size,), (1,)), path)
    if isinstance(obj, dict):
        resolved = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            resolved[key] = _resolve(value, path)
        return resolved
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, path) for v in obj)
    return obj


def load_torch_file(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

    Raises `BundleError` when the file is missing, not a PyTorch file, corrupt, or its pickle
    references anything but tensors, storages and OrderedDicts (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.BundleError(f"PyTorch weight file {path} does not exist.")
    if zipfile.is_zipfile(path):
        try:
            obj, _ = _read_zip(path)
        except zipfile.BadZipFile as e:
            raise errors.BundleError(f"{path}: corrupt zip archive ({e}).") from e
    else:
        obj, _ = _read_legacy(path)
    return _resolve(obj, path)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `torch.save`d state_dict as {name: numpy array}; see `load_torch_file`.

    Accepts a bare state_dict or a dict holding one under "state_dict"; raises `BundleError`
    when the file holds anything else.
    """
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    ):
        raise errors.BundleError(
            f"{os.fspath(path)}: expected a state_dict (a dict of name -> tensor), "
            f"found {type(obj).__name__}."
        )
    return dict(obj)
