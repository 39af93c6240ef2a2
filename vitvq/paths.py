"""Workdirs and bundles that are local paths or URLs (`gs://bucket/run` on TPU pods).

Every file vitvq reads or writes outside the data pipeline goes through here or through
orbax and clu, which handle URLs themselves:

- Local paths behave as plain files always did: relative paths are made absolute
  (`os.path.abspath`), and whole-file writes are atomic (a temporary file next to the target,
  then `os.replace`), so a crash leaves the old file or the new one, never half of one.
- URLs (anything with "://") are kept exactly as given and reached through `etils.epath`,
  which uses tf.io.gfile for gs://. An object store has no atomic rename, so a whole-file
  write is one upload instead: GCS makes an object visible only once it is complete, so
  readers again see the old object or the new one. Appending (metrics.jsonl) re-uploads the
  whole object on each write; that is cheap at one row per logged step.

Only schemes that epath knows are accepted (gs://, s3://, az://, hf://; vitvq is tested on
gs://-like paths); any other URL is a ConfigError rather than a local directory named
"ram:" appearing by accident.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

from vitvq.errors import ConfigError


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (gs://bucket/run), False for local paths."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` as a string: a URL unchanged, a local path made absolute."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for `absolute(path)`; ConfigError for a URL scheme epath cannot reach."""
    text = absolute(path)
    try:
        result = epath.Path(text)
    except KeyError:  # epath has no class for this scheme
        result = None
    if is_url(text) and (result is None or os.fspath(result).rstrip("/") != text.rstrip("/")):
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"{text}: URLs of the form {scheme}:// are not supported; use a local path or "
            "gs://bucket/path (any scheme etils.epath knows: gs, s3, az, hf)."
        )
    return result


def join(path: str | os.PathLike, *parts: str) -> str:
    """`path/part/...` as a string (a URL stays a URL)."""
    return os.fspath(as_path(path).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    return as_path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
    """Creates `path` and its parents (on an object store: nothing to create, a no-op)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` as the whole file `path`, creating its directory; never half-written.

    Local: a temporary file in the same directory, then `os.replace`. URL: one upload (an
    object store publishes an object only when it is complete; there is no rename to use).
    """
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(os.fspath(target)):
        target.write_bytes(data)
        return
    # A unique name beside the target (so the rename stays on one filesystem), created with
    # the usual permissions (mkstemp's would be 0600).
    tmp = os.path.join(
        os.fspath(target.parent), f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to the file `path` (created with its directory if missing).

    On an object store this downloads and re-uploads the object (tf.io.gfile's append mode).
    """
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as f:
        f.write(text)


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return as_path(path).read_text()
