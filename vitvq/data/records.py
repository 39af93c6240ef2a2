"""Sources read by random access as encoded image bytes: a folder of files, and TFDS.

Both expose the same small interface, used by the pipeline:

- `num_classes`, `random_flip`, `size(role)` with role "train" or "eval";
- `read(role, indices)` -> (list of encoded image bytes, int32 labels); a negative index is
  padding and reads as empty bytes with label 0;
- `describe(role, index)`: where one record lives, for error messages.

Decoding happens later, in the TensorFlow pipeline. TensorFlow and TFDS are imported only
when a TFDS source is opened.
"""

import concurrent.futures
import os
import zlib

import numpy as np

from vitvq.data.preprocess import import_tf
from vitvq.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
_READ_THREADS = 16
_pool = None  # one thread pool for all readers: sources are opened anew for every eval


def _read_all(fn, indices: np.ndarray) -> list:
    """[fn(i) for i in indices], in order, with file/record reads overlapped in threads."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, "vitvq-data-read")
    return list(_pool.map(fn, [int(i) for i in indices]))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(directory: str) -> list[str]:
    """Image files under `directory` (recursively), sorted; hidden files and dirs skipped."""
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(parent, f) for f in sorted(files) if _is_image(f))
    return found


def _scan(directory: str, class_names: list[str] | None = None):
    """(files, labels, class_names) of a directory: one subfolder per class, or flat.

    With class subfolders, only images inside them count. `class_names` given (the
    training classes) maps the subfolders of an evaluation directory onto them.
    """
    subdirs = sorted(
        d
        for d in os.listdir(directory)
        if not d.startswith(".") and os.path.isdir(os.path.join(directory, d))
    )
    per_class = {d: _walk_images(os.path.join(directory, d)) for d in subdirs}
    per_class = {d: files for d, files in per_class.items() if files}
    if not per_class:  # flat folder: unlabelled
        files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if _is_image(f))
        return files, np.zeros(len(files), np.int32), class_names or []
    if class_names is None:
        class_names = sorted(per_class)
    unknown = sorted(set(per_class) - set(class_names))
    if unknown:
        raise DataError(
            f"class folders {unknown} in {directory} are not among the training classes "
            f"{class_names}: use the same class subfolders in every split"
        )
    files, labels = [], []
    for label, name in enumerate(class_names):
        files.extend(per_class.get(name, []))
        labels.extend([label] * len(per_class.get(name, [])))
    return files, np.asarray(labels, np.int32), class_names


def _hold_out(files: list[str], labels: np.ndarray, root: str, fraction: float):
    """Splits files by a hash of their relative path: stable as files are added.

    Returns ((train files, train labels), (eval files, eval labels)), both in path order.
    """
    count = len(files)
    num_eval = 0 if count < 2 else max(1, round(fraction * count))
    order = sorted(
        range(count),
        key=lambda i: (zlib.crc32(os.path.relpath(files[i], root).encode()), files[i]),
    )
    is_eval = np.zeros(count, bool)
    is_eval[order[:num_eval]] = True
    train = ([f for f, e in zip(files, is_eval, strict=True) if not e], labels[~is_eval])
    evaluation = ([f for f, e in zip(files, is_eval, strict=True) if e], labels[is_eval])
    return train, evaluation


class FolderSource:
    """A directory of images; each subfolder is a class (sorted names -> labels 0..K-1).

    Layouts: `root/<train_split>/` and `root/<eval_split>/` when those folders exist;
    otherwise `root/` itself, with `eval_fraction` of the files (chosen by a hash of the
    relative path, at least one file) held out for evaluation. A folder without class
    subfolders is unlabelled (num_classes 0). Extensions: bmp, jpeg, jpg, png, webp.
    """

    random_flip = True

    def __init__(self, root: str, *, train_split: str, eval_split: str, eval_fraction: float):
        root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.isdir(root):
            raise DataError(
                f"image folder {root} does not exist: set dataset.path to a directory of "
                "images with one subfolder per class"
            )
        self.root = root
        train_root = os.path.join(root, train_split)
        eval_root = os.path.join(root, eval_split)
        if os.path.isdir(train_root):
            train = _scan(train_root)
            self.class_names = train[2]
            if os.path.isdir(eval_root):
                evaluation = _scan(eval_root, self.class_names)[:2]
                train = train[:2]
            else:
                train, evaluation = _hold_out(train[0], train[1], train_root, eval_fraction)
        else:
            files, labels, self.class_names = _scan(root)
            train, evaluation = _hold_out(files, labels, root, eval_fraction)
        if not train[0]:
            raise DataError(
                f"no training images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}"
            )
        self.num_classes = len(self.class_names)
        self._files = {"train": train[0], "eval": evaluation[0]}
        self._labels = {"train": train[1], "eval": evaluation[1]}

    def size(self, role: str) -> int:
        """Number of examples in the role's split."""
        return len(self._files[role])

    def describe(self, role: str, index: int) -> str:
        """The file of one example."""
        return self._files[role][index]

    def _read_one(self, role: str, index: int) -> bytes | OSError:
        if index < 0:
            return b""
        try:
            with open(self._files[role][index], "rb") as f:
                return f.read()
        except OSError as e:  # screened out (and logged) by vitvq.data.screen
            return e

    def read(self, role: str, indices: np.ndarray):
        """Encoded bytes and labels of the given examples (negative index: padding); a file
        that cannot be read gives its OSError instead of bytes."""
        encoded = _read_all(lambda i: self._read_one(role, i), indices)
        labels = np.where(indices >= 0, self._labels[role][np.maximum(indices, 0)], 0)
        return encoded, labels.astype(np.int32)


def import_tfds():
    """Imports tensorflow_datasets (and TensorFlow, accelerators hidden from it)."""
    import_tf()
    # deferred: tensorflow_datasets (and TensorFlow), only for tfds input
    import tensorflow_datasets as tfds

    return tfds


def _prepare_instructions(builder, name: str, data_dir: str | None) -> str:
    target = f" --data_dir={data_dir}" if data_dir else ""
    manual = ""
    if name.split("/")[0] == "imagenet2012":
        manual = (
            " ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar from https://image-net.org into a folder FOLDER and add "
            "--manual_dir=FOLDER."
        )
    elif getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        manual = (
            " This dataset needs a manual download (see its TFDS catalog page); add "
            "--manual_dir=FOLDER."
        )
    return (
        f"Prepare it once, in the random-access array_record format, with: "
        f"`tfds build {name}{target} --file_format=array_record`.{manual}"
    )


class TfdsSource:
    """A TFDS image dataset read by random access (`builder.as_data_source`).

    Images stay encoded (`tfds.decode.SkipDecoding`) and are decoded in the tf.data
    pipeline. Requires the array_record file format (the default `tfds build` writes
    tfrecord: rebuild or convert, as the error message says).
    """

    random_flip = True

    def __init__(self, name: str, *, data_dir, train_split, eval_split, image_key, label_key):
        tfds = import_tfds()
        self._tfds = tfds
        self.name = name
        self._data_dir = data_dir
        try:
            self._builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ConfigError(
                f"dataset.tfds_name={name!r} is not a TFDS dataset: see "
                "https://www.tensorflow.org/datasets/catalog/overview"
            ) from e
        features = dict(self._builder.info.features.items())
        if not isinstance(features.get(image_key), tfds.features.Image):
            raise ConfigError(
                f"TFDS dataset {name!r} has no image feature {image_key!r} (its features: "
                f"{sorted(features.keys())}): set dataset.image_key"
            )
        label = features.get(label_key)
        self._label_key = label_key if isinstance(label, tfds.features.ClassLabel) else None
        self.num_classes = label.num_classes if self._label_key else 0
        self.class_names = list(label.names) if self._label_key else []
        self._image_key = image_key
        self._splits = {"train": train_split, "eval": eval_split}
        self._sources = {}

    def _source(self, role: str):
        if role not in self._sources:
            self._sources[role] = self._open(self._splits[role])
        return self._sources[role]

    def _open(self, split: str):
        decoders = {self._image_key: self._tfds.decode.SkipDecoding()}
        try:
            return self._builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # TFDS raises many types here; all mean "cannot open"
            where = self._builder.data_dir
            if not self._builder.is_prepared():
                raise DataError(
                    f"TFDS dataset {self.name!r} is not prepared in {where}. "
                    + _prepare_instructions(self._builder, self.name, self._data_dir)
                ) from e
            formats = {f.value for f in self._builder.info.available_file_formats()}
            hint = ""
            if "array_record" not in formats:
                hint = (
                    f" It is stored as {sorted(formats)}, but vitvq reads by random access: "
                    f"convert it with `tfds convert_format --dataset_version_dir={where} "
                    "--out_file_format=array_record`."
                )
            raise DataError(
                f"cannot open split {split!r} of TFDS dataset {self.name!r} at {where}: {e}.{hint}"
            ) from e

    def size(self, role: str) -> int:
        """Number of examples in the role's split."""
        return len(self._source(role))

    def describe(self, role: str, index: int) -> str:
        """Where one example lives."""
        return f"example {index} of split {self._splits[role]!r} of TFDS dataset {self.name!r}"

    def _read_one(self, role: str, index: int):
        if index < 0:
            return b"", 0
        example = self._source(role)[index]
        label = int(example[self._label_key]) if self._label_key else 0
        encoded = example[self._image_key]
        if isinstance(encoded, np.ndarray):  # a 0-d bytes array
            encoded = encoded.item()
        return bytes(encoded), label

    def read(self, role: str, indices: np.ndarray):
        """Encoded bytes and labels of the given examples (negative index: padding)."""
        self._source(role)  # open in this thread, so that errors surface here
        pairs = _read_all(lambda i: self._read_one(role, i), indices)
        return [p[0] for p in pairs], np.asarray([p[1] for p in pairs], np.int32)
