"""Unreadable image files (folder and TFDS sources): skipped, counted, logged once each.

A long run must not die on one broken file among a million, nor silently train on fewer
images than the user thinks. Every record read for a batch is screened:

- cheaply, from its bytes (`sniff`): empty files, files that are not JPEG/PNG/GIF/BMP/WebP
  whatever their extension, JPEGs without an end-of-image marker after their last scan and
  PNGs without an IEND chunk (truncated downloads) are found without decoding;
- and by decoding: a record that passes the sniff but that TensorFlow cannot decode fails
  its batch; the pipeline then decodes that batch's records one by one, marks the culprits
  unreadable and rebuilds itself from that batch (rare: one rebuild per such file).

A skipped training example is replaced by the next readable example of the split (index
i -> i+1, i+2, ... modulo the split size), so a batch stays a function of (seed, step) and of
which files are unreadable, never of when they were found: a resumed run reads exactly the
batches an uninterrupted one reads. A skipped evaluation example becomes padding (mask 0).
Readable oddities (grayscale, RGBA, CMYK, palette, 16-bit, tiny or huge images, a PNG named
.jpg) are decoded and converted to RGB by TensorFlow as usual.

Each unreadable file is logged once, with its name and the reason; `skipped_images()` counts
those found by this process (the trainers log it as `data/skipped_images`). A split with no
readable image at all stops with a DataError.
"""

import logging
import re
import threading

import numpy as np

from vitvq.data import preprocess
from vitvq.errors import DataError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_unreadable: dict[str, str] = {}  # record description (file path) -> reason


def skipped_images() -> int:
    """How many distinct unreadable records this process has found (and skips)."""
    return len(_unreadable)


def unreadable_records() -> dict[str, str]:
    """{record (file path): reason} of every unreadable record this process has found."""
    with _lock:
        return dict(_unreadable)


def forget_unreadable() -> None:
    """Clears the record of unreadable files (tests; a process reading unrelated data)."""
    with _lock:
        _unreadable.clear()


def mark_unreadable(where: str, reason: str) -> None:
    """Records one unreadable record; the first time, logs it with the running count."""
    with _lock:
        if where in _unreadable:
            return
        _unreadable[where] = reason
        count = len(_unreadable)
    logger.warning("Skipping unreadable image %s: %s (%d skipped so far).", where, reason, count)


def sniff(data) -> str | None:
    """Why these bytes cannot be an image, judged without decoding; None if they may be one.

    `data` is the encoded file, or the OSError raised while reading it.
    """
    if isinstance(data, OSError):
        return f"cannot read the file ({data})"
    if not data:
        return "empty file"
    if data[:3] == b"\xff\xd8\xff":  # JPEG
        last_scan = data.rfind(b"\xff\xda")  # start of the last scan (progressive: several)
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            return "truncated JPEG (no end-of-image marker after its last scan)"
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk at the end)"
        return None
    if data[:6] in (b"GIF87a", b"GIF89a") or data[:2] == b"BM":
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return None
    return "not an image file (its first bytes are no JPEG, PNG, GIF, BMP or WebP signature)"


def _tf_reason(message: str) -> str:
    """A TensorFlow error message without its op and device decorations."""
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", message)
    return " ".join(message.split()) or "decoding failed"


class Screen:
    """Screened reads of one role ("train" or "eval") of a record source."""

    def __init__(self, source, role: str):
        self._source = source
        self._role = role
        self._size = source.size(role)

    def _where(self, index: int) -> str:
        return self._source.describe(self._role, int(index))

    def _known_bad(self, index: int) -> bool:
        with _lock:
            return self._where(index) in _unreadable

    def _check(self, index: int, data) -> bool:
        """True if `data` (record `index`) may be decoded; marks it unreadable otherwise."""
        where = self._where(index)
        with _lock:
            if where in _unreadable:
                return False
        reason = sniff(data)
        if reason is not None:
            mark_unreadable(where, reason)
            return False
        return True

    def _replacement(self, index: int):
        """(example, bytes, label) of the first readable example after `index` (cyclically)."""
        for step in range(1, self._size + 1):
            candidate = (int(index) + step) % self._size
            if self._known_bad(candidate):
                continue
            encoded, labels = self._source.read(self._role, np.asarray([candidate]))
            if self._check(candidate, encoded[0]):
                return candidate, encoded[0], labels[0]
        self._raise_nothing_readable()

    def _raise_nothing_readable(self):
        examples = "; ".join(f"{w}: {r}" for w, r in list(unreadable_records().items())[:3])
        raise DataError(
            f"none of the {self._size} {self._role} images could be read (e.g. {examples}): "
            "check the dataset path and the files"
        )

    def read(self, indices: np.ndarray, mask: np.ndarray):
        """(encoded bytes, labels, mask) of a batch plan's examples, unreadable ones replaced
        by the next readable example (train) or turned into padding (eval, mask 0)."""
        return self._read(indices, mask)[:3]

    def _read(self, indices: np.ndarray, mask: np.ndarray):
        """`read`, and the example each position's bytes came from (-1: none)."""
        encoded, labels = self._source.read(self._role, indices)
        encoded, labels, mask = list(encoded), np.array(labels), np.array(mask)
        used = np.array(indices)
        for position, index in enumerate(indices):
            if index < 0 or self._check(index, encoded[position]):
                continue
            if self._role == "train":
                used[position], encoded[position], labels[position] = self._replacement(index)
            else:
                used[position], encoded[position], labels[position], mask[position] = (
                    -1,
                    b"",
                    0,
                    0.0,
                )
        return encoded, labels, mask, used

    def mark_undecodable(self, indices: np.ndarray, mask: np.ndarray) -> int:
        """Decodes a failed batch's records one by one and marks those TensorFlow rejects;
        returns how many it found (0: the failure was not a bad image)."""
        tf = preprocess.import_tf()
        found = 0
        # Replacements are checked too: the batch is re-read as the rebuilt pipeline will.
        while True:
            encoded, _, batch_mask, used = self._read(indices, mask)
            bad = None
            for position, record in enumerate(encoded):
                if not record or batch_mask[position] == 0:
                    continue
                try:
                    tf.io.decode_image(record, channels=3, expand_animations=False)
                except tf.errors.OpError as e:
                    bad = position
                    reason = f"TensorFlow cannot decode it ({_tf_reason(e.message)})"
                    break
            if bad is None:
                return found
            mark_unreadable(self._where(used[bad]), reason)
            found += 1
