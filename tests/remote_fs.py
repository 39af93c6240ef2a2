"""Non-local workdirs in tests, without GCS or a network: two stand-ins for gs://.

`tf_ram(monkeypatch)`: teaches etils.epath the scheme `ram://` and sends it to epath's
tf.io.gfile backend, i.e. TensorFlow's in-memory filesystem: the same code path as gs://
(epath's `_TfBackend`), on a filesystem that is really not local. TensorFlow's RAM files do
not truncate when reopened for writing (GCS replaces the object), so opening for "w" removes
the old file first, as GCS would.

`mirrored_remote(monkeypatch, root)`: `ram://` URLs for everything that goes through epath or
orbax, with the bytes kept under the local directory `root`, so that orbax's array data
(TensorStore, which cannot reach TensorFlow's RAM filesystem) and its metadata (epath) live
in one place. orbax is told to treat these URLs as GCS paths: it then uses its GCS protocol
(step directories written in place and committed by a `commit_success.txt` file, no renames)
and hands TensorStore a kvstore for the URL, which is mapped to `root`. clu's TensorBoard
writer goes through tf.io.gfile directly, so its event files land in TensorFlow's real RAM
filesystem under the same URL. Any code that opened a `ram://` URL with `open()` or `os`
instead would create a local directory named "ram:" in the current directory (tests check
there is none) or fail.

Both patch private names of etils and orbax; when those change, the fixtures skip the tests
that need them with the reason, instead of failing for reasons unrelated to vitvq.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

SCHEME = "ram"
PREFIX = f"{SCHEME}://"


def _epath_modules():
    from etils.epath import backend, gpath, register

    needed = [(gpath, n) for n in ("_URI_PREFIXES", "_URI_SCHEMES", "_URI_MAP_ROOT")]
    needed += [(gpath, "_GCS_BACKENDS"), (gpath, "_GPath"), (register, "_URI_PREFIXES_TO_CLS")]
    needed += [(backend, "tf_backend")]
    missing = [f"{m.__name__}.{n}" for m, n in needed if not hasattr(m, n)]
    if missing:
        pytest.skip(f"etils.epath internals changed, cannot register {PREFIX}: no {missing}")
    return backend, gpath, register


def _register_scheme(monkeypatch, backend_for_scheme) -> None:
    """Makes epath parse `ram://...` like gs:// and route it to `backend_for_scheme`."""
    backend, gpath, register = _epath_modules()
    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, PREFIX))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {SCHEME})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, PREFIX, f"/{SCHEME}/")
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, PREFIX, gpath.PosixGPath)
    monkeypatch.setattr(gpath, "_GCS_BACKENDS", gpath._GCS_BACKENDS | {backend_for_scheme})
    original = gpath._GPath._backend

    def _backend(self):
        if self._uri_scheme == SCHEME:
            return backend_for_scheme
        return original.fget(self)

    monkeypatch.setattr(gpath._GPath, "_backend", property(_backend))


def _replacing_tf_backend():
    """epath's tf.io.gfile backend, with "w" replacing a file as on GCS."""
    backend, _, _ = _epath_modules()

    class ReplacingTfBackend(type(backend.tf_backend)):
        def open(self, path, mode, *args, **kwargs):
            if "w" in mode and self.gfile.exists(path):
                self.gfile.remove(path)
            return super().open(path, mode, *args, **kwargs)

    return ReplacingTfBackend()


def tf_ram(monkeypatch) -> None:
    """`ram://` through epath -> tf.io.gfile -> TensorFlow's RAM filesystem."""
    _register_scheme(monkeypatch, _replacing_tf_backend())


def ram_tree(url: str) -> dict[str, list[str]]:
    """{directory URL: file names} of TensorFlow's RAM filesystem under `url`."""
    import tensorflow as tf

    return {root: sorted(files) for root, _, files in tf.io.gfile.walk(url)}


class _MirrorBackend:
    """An epath backend for `ram://X` that stores X under a local root (through tf.io.gfile)."""

    def __init__(self, root: str, inner):
        self.root = os.path.abspath(root)
        self.inner = inner

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith(PREFIX), path
        return os.path.join(self.root, path[len(PREFIX) :])

    def url(self, local) -> str:
        rel = os.path.relpath(os.fspath(local), self.root)
        return PREFIX + ("" if rel == "." else rel)

    def open(self, path, mode, *args, **kwargs):
        return self.inner.open(self.local(path), mode, *args, **kwargs)

    def exists(self, path):
        return self.inner.exists(self.local(path))

    def isdir(self, path):
        return self.inner.isdir(self.local(path))

    def listdir(self, path):
        return self.inner.listdir(self.local(path))

    def glob(self, path):
        return [self.url(p) for p in self.inner.glob(self.local(path))]

    def walk(self, top, *args, **kwargs) -> Iterator:
        for root, dirs, files in self.inner.walk(self.local(top), *args, **kwargs):
            yield self.url(root), dirs, files

    def makedirs(self, path, *args, **kwargs):
        return self.inner.makedirs(self.local(path), *args, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        return self.inner.mkdir(self.local(path), *args, **kwargs)

    def rmtree(self, path):
        return self.inner.rmtree(self.local(path))

    def remove(self, path):
        return self.inner.remove(self.local(path))

    def rename(self, path, dst):
        return self.inner.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return self.inner.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return self.inner.copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return self.inner.stat(self.local(path))


def mirrored_remote(monkeypatch, root) -> _MirrorBackend:
    """`ram://` URLs for epath and orbax (as GCS paths), stored under `root`; see above."""
    mirror = _MirrorBackend(str(root), _replacing_tf_backend())
    _register_scheme(monkeypatch, mirror)
    try:
        import orbax.checkpoint.utils as ocp_utils
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        is_gcs_path = gcs_utils.is_gcs_path
        use_gcs_driver = ts_utils._use_gcs_driver
        kvstore_for_gcs = gcs_utils.get_kvstore_for_gcs
    except (ImportError, AttributeError) as err:
        pytest.skip(f"orbax internals changed, cannot map {PREFIX} to GCS handling: {err}")

    def is_remote(path) -> bool:
        return os.fspath(path).startswith(PREFIX) or is_gcs_path(path)

    def tensorstore_path(directory: str) -> str:
        # orbax normalizes "ram://b/x" to "ram:/b/x" before asking for a kvstore.
        return directory.replace(f"{SCHEME}:/", PREFIX, 1) if "://" not in directory else directory

    def kvstore(path: str):
        url = tensorstore_path(path)
        if url.startswith(PREFIX):
            return {"driver": "file", "path": mirror.local(url)}
        return kvstore_for_gcs(path)

    monkeypatch.setattr(gcs_utils, "is_gcs_path", is_remote)
    if hasattr(ocp_utils, "is_gcs_path"):
        monkeypatch.setattr(ocp_utils, "is_gcs_path", is_remote)
    monkeypatch.setattr(
        ts_utils,
        "_use_gcs_driver",
        lambda d: tensorstore_path(d).startswith(PREFIX) or use_gcs_driver(d),
    )
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    return mirror
