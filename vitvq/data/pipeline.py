"""Per-process batches for training and evaluation, a pure function of (seed, step).

Determinism. Training example `i` of step `s` (global position `s * B + i`, B the global
batch) is example `perm_e[(s * B + i) % N]` of the training split, where `e = (s * B + i)
// N` is its epoch and `perm_e` a permutation of the N examples drawn from
`numpy.random.default_rng([seed, 0, e])`. Its augmentation (crop position, mirror) comes
from three uniform numbers, row `i` of `default_rng([seed, 1, s]).random((B, 3))`.
Process `p` of `P` takes rows `[p * B/P, (p + 1) * B/P)` of every global batch and reads
only those examples. So a batch depends on (seed, step) only: an iterator started at
`start_step=k` yields exactly what an uninterrupted one yields from step k, at O(1) cost
(one permutation of the current epoch), and the processes' shares are disjoint and make
up the one-process batch.

Evaluation walks the eval split once, in order, in global batches of B; process `p` takes
the same rows of each global batch; positions past the end are padding (mask 0, black
image, label 0), so every process runs the same number of batches.

`dataset.shuffle_buffer` is accepted and unused: the readers shuffle whole epochs exactly.
"""

import contextlib
import itertools
import math

import numpy as np

from vitvq.data import preprocess, records, screen, sources
from vitvq.errors import ConfigError, DataError

KNOWN_SOURCES = ("digits", "photos", "folder", "tfds", "synthetic")
_NUM_AUGMENT_PARAMS = 4  # (u_top, u_left, u_flip, u_scale)


def _get(config, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def _seed_entropy(seed) -> int:
    return int(seed) % 2**64


def _source_name(config) -> str:
    name = _get(config, "name")
    if name not in KNOWN_SOURCES:
        raise ConfigError(
            f"unknown dataset.name={name!r}: known sources are {', '.join(KNOWN_SOURCES)}"
        )
    return name


# The record sources opened inside `sources_kept()`, by what opened them; None outside it.
_kept: dict | None = None


@contextlib.contextmanager
def sources_kept():
    """Within this block a folder or tfds dataset is opened once per configuration and reused.

    Opening a folder dataset lists every file of both splits (an ImageNet folder: over a
    million paths, minutes on a network file system), and a run asks for its dataset's size,
    its training batches and, at every evaluation, its eval batches. The trainer keeps its
    sources for the run; outside the block each call opens the dataset again, so files added
    between two calls are seen. Blocks nest (the outermost one owns the sources)."""
    global _kept
    outermost = _kept is None
    if outermost:
        _kept = {}
    try:
        yield
    finally:
        if outermost:
            _kept = None


def _open_records(config, name: str):
    train_split = _get(config, "train_split", "train")
    eval_split = _get(config, "eval_split", "validation")
    if name == "folder":
        path = _get(config, "path")
        if not path:
            raise ConfigError("dataset.name='folder' needs dataset.path, a directory of images")
        fraction = float(_get(config, "eval_fraction", 0.05))
        key = (name, str(path), train_split, eval_split, fraction)
        opener = lambda: records.FolderSource(  # noqa: E731
            path, train_split=train_split, eval_split=eval_split, eval_fraction=fraction
        )
    else:
        tfds_name = _get(config, "tfds_name")
        if not tfds_name:
            raise ConfigError("dataset.name='tfds' needs dataset.tfds_name, e.g. 'imagenet2012'")
        options = dict(
            data_dir=_get(config, "data_dir"),
            train_split=train_split,
            eval_split=eval_split,
            image_key=_get(config, "image_key", "image"),
            label_key=_get(config, "label_key", "label"),
        )
        key = (name, tfds_name, *sorted(options.items()))
        opener = lambda: records.TfdsSource(tfds_name, **options)  # noqa: E731
    if _kept is None:
        return opener()
    if key not in _kept:
        _kept[key] = opener()
    return _kept[key]


def _check_num_classes(config, source_classes: int) -> None:
    wanted = int(_get(config, "num_classes", 0))
    if wanted not in (0, source_classes):
        raise ConfigError(
            f"dataset.num_classes={wanted} but the {_get(config, 'name')} data has "
            f"{source_classes} classes: use {source_classes}, or 0 for unconditional"
        )


def _open_source(config, image_size: int):
    """An `ArraySource` (in-memory) or a record source (folder, tfds)."""
    name = _source_name(config)
    if name == "digits":
        source = sources.load_digits(image_size)
    elif name == "photos":
        source = sources.load_photos(image_size)
    elif name == "synthetic":
        source = sources.load_synthetic(image_size, int(_get(config, "num_classes", 0)))
    else:
        source = _open_records(config, name)
    _check_num_classes(config, source.num_classes)
    return source


def _split_size(source, role: str) -> int:
    if isinstance(source, sources.ArraySource):
        return len(getattr(source, role))
    return source.size(role)


def dataset_info(dataset_config) -> dict:
    """{num_train, num_eval, num_classes, class_names} of the configured dataset.

    `num_classes` is the number of classes the labels range over (0: unlabelled, labels are
    all 0); `dataset.num_classes` must be 0 (unconditional) or that number. For `photos`,
    `num_train` counts training photos (each step crops them anew) and `num_eval` the fixed
    held-out crops.
    """
    name = _source_name(dataset_config)
    if name == "digits":
        num_train, num_eval = sources.DIGITS_NUM_TRAIN, sources.DIGITS_NUM_EVAL
        num_classes, class_names = 10, [str(i) for i in range(10)]
    elif name == "photos":
        num_train, num_eval, num_classes = len(sources.PHOTOS_TRAIN), sources.PHOTOS_NUM_EVAL, 0
        class_names = []
    elif name == "synthetic":
        num_classes = int(_get(dataset_config, "num_classes", 0))
        num_train, num_eval = sources.SYNTHETIC_NUM_TRAIN, sources.SYNTHETIC_NUM_EVAL
        class_names = []
    else:
        source = _open_records(dataset_config, name)
        num_train, num_eval = source.size("train"), source.size("eval")
        num_classes = source.num_classes
        class_names = list(getattr(source, "class_names", []) or [])
    _check_num_classes(dataset_config, num_classes)
    return {
        "num_train": num_train,
        "num_eval": num_eval,
        "num_classes": num_classes,
        "class_names": class_names or None,
    }


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """The per-process batch; checks the batch and process arguments."""
    if int(global_batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {global_batch_size}")
    if int(process_count) < 1 or not 0 <= int(process_index) < int(process_count):
        raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ConfigError(
            f"batch_size={global_batch_size} is not divisible by the number of processes "
            f"({process_count}): use a multiple of {process_count}"
        )
    return global_batch_size // process_count


def _check_image_size(image_size: int) -> None:
    if int(image_size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")


class _TrainPlan:
    """step -> (example indices [b], augmentation numbers [b, 3], mask [b] of ones) of a process."""

    def __init__(self, seed, num_examples: int, global_batch: int, start: int, stop: int):
        if num_examples < 1:
            raise DataError("the training split is empty")
        self._seed = _seed_entropy(seed)
        self._num_examples = num_examples
        self._global_batch = global_batch
        self._rows = np.arange(start, stop, dtype=np.int64)
        self._permutations = {}  # epoch -> permutation; a batch spans few epochs

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self._seed, 0, epoch])
            self._permutations[epoch] = rng.permutation(self._num_examples)
        return self._permutations[epoch]

    def __call__(self, step: int):
        positions = step * self._global_batch + self._rows
        epochs = positions // self._num_examples
        indices = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = self._permutation(int(epoch))[positions[chosen] % self._num_examples]
        rng = np.random.default_rng([self._seed, 1, step])
        params = rng.random((self._global_batch, _NUM_AUGMENT_PARAMS))[self._rows]
        return indices, params.astype(np.float32), np.ones(len(positions), np.float32)


def _eval_plan(num_examples: int, global_batch: int, start: int, stop: int):
    rows = np.arange(start, stop, dtype=np.int64)

    def plan(batch: int):
        positions = batch * global_batch + rows
        mask = positions < num_examples
        params = np.zeros((len(rows), _NUM_AUGMENT_PARAMS), np.float32)
        return np.where(mask, positions, -1), params, mask.astype(np.float32)

    return plan


def train_batches(
    dataset_config,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite iterator of this process's training batches from `start_step` on.

    Yields dict(image=float32 [b, image_size, image_size, 3] in [0, 1], label=int32 [b]),
    b = global_batch_size / process_count. Crops: random `image_size` crops (after resizing
    the shorter side to `image_size` for folder and tfds; at native resolution for photos),
    mirrored at random when `dataset.random_flip` (default: on, off for digits).
    """
    local = local_batch_size(global_batch_size, process_index, process_count)
    _check_image_size(image_size)
    if int(start_step) < 0:
        raise ConfigError(f"start_step must be >= 0, got {start_step}")
    source = _open_source(dataset_config, image_size)
    flip = bool(_get(dataset_config, "random_flip", source.random_flip))
    crop_scale = _crop_scale(dataset_config)
    start = process_index * local
    plan = _TrainPlan(seed, _split_size(source, "train"), global_batch_size, start, start + local)
    if isinstance(source, sources.ArraySource):
        return _array_train(source.train, plan, int(start_step), image_size, flip, crop_scale)
    if crop_scale is not None:
        raise ConfigError(
            f"dataset.crop_scale is supported for the in-memory sources (digits, photos, "
            f"synthetic), not for {_get(dataset_config, 'name')!r}; remove it"
        )
    example_fn = preprocess.tf_train_example(image_size, flip)
    step_plan = lambda batch: plan(int(start_step) + batch)
    return _record_batches(source, "train", step_plan, None, local, example_fn)


def eval_batches(
    dataset_config,
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
    split: str = "eval",
    start_batch: int = 0,
):
    """This process's batches of one pass over the eval split (its first `num_examples`).

    Yields dict(image=float32 [b, H, W, 3], label=int32 [b], mask=float32 [b]) with mask 1
    for real examples and 0 for padding; every process yields ceil(n / global_batch_size)
    batches. Center crops (after resizing the shorter side, for folder and tfds).
    `split="train"` walks the training split the same way (no augmentation: the linear
    probe's features); `start_batch` skips the batches before it (a resumed pass).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    local = local_batch_size(global_batch_size, process_index, process_count)
    _check_image_size(image_size)
    source = _open_source(dataset_config, image_size)
    total = _split_size(source, split)
    if num_examples is not None:
        if int(num_examples) < 0:
            raise ConfigError(f"num_examples must be >= 0, got {num_examples}")
        total = min(total, int(num_examples))
    first = int(start_batch)
    num_batches = max(0, math.ceil(total / global_batch_size) - first)
    start = process_index * local
    whole = _eval_plan(total, global_batch_size, start, start + local)
    plan = lambda batch: whole(first + batch)  # noqa: E731
    if isinstance(source, sources.ArraySource):
        return _array_eval(getattr(source, split), plan, num_batches, image_size)
    example_fn = preprocess.tf_eval_example(image_size)
    return _record_batches(source, split, plan, num_batches, local, example_fn)


def _crop_scale(dataset_config) -> tuple[float, float] | None:
    """`dataset.crop_scale` as (lo, hi) fractions of the shorter side, or None."""
    value = _get(dataset_config, "crop_scale", None)
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"dataset.crop_scale must be two fractions (lo, hi) of the shorter side, got {value!r}"
        ) from e
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"dataset.crop_scale must satisfy 0 < lo <= hi <= 1, got {value!r}")
    return lo, hi


def _array_train(
    split: sources.ArraySplit,
    plan,
    start_step: int,
    size: int,
    flip: bool,
    crop_scale: tuple[float, float] | None = None,
):
    for step in itertools.count(start_step):
        indices, params, _ = plan(step)
        images = np.stack(
            [
                preprocess.train_crop_np(split.images[i], p, size, flip, crop_scale)
                for i, p in zip(indices, params, strict=True)
            ]
        )
        yield {"image": preprocess.to_float_np(images), "label": split.labels[indices]}


def _array_eval(split: sources.ArraySplit, plan, num_batches: int, size: int):
    for batch in range(num_batches):
        indices, _, mask = plan(batch)
        images = np.zeros((len(indices), size, size, 3), np.uint8)
        for row, index in enumerate(indices):
            if index >= 0:
                images[row] = preprocess.center_crop_np(split.images[index], size)
        labels = np.where(indices >= 0, split.labels[np.maximum(indices, 0)], 0)
        yield {
            "image": preprocess.to_float_np(images),
            "label": labels.astype(np.int32),
            "mask": mask,
        }


def _record_batches(source, role: str, plan, num_batches: int | None, local: int, example_fn):
    """tf.data over a record source: read and screen in Python threads, decode/crop in parallel.

    Unreadable records are skipped (see `vitvq.data.screen`); when TensorFlow fails on one
    the sniff let through, the pipeline is rebuilt from that batch with it marked.
    """
    op_error = preprocess.import_tf().errors.OpError
    screened = screen.Screen(source, role)
    first = 0
    while True:
        dataset = _record_dataset(screened, plan, first, num_batches, local, example_fn)
        batch = first
        iterator = dataset.as_numpy_iterator()
        try:
            for values in iterator:
                yield values
                batch += 1
            return
        except op_error as e:
            indices, _, mask = plan(batch)
            if not screened.mark_undecodable(indices, mask):
                raise DataError(f"reading the {role} data failed: {e.message}") from e
            first = batch  # rebuild from the failed batch, the culprits now skipped


def _record_dataset(screened, plan, first: int, num_batches: int | None, local: int, example_fn):
    tf = preprocess.import_tf()

    def generate():
        stop = None if num_batches is None else num_batches
        for batch in itertools.count(first) if stop is None else range(first, stop):
            indices, params, mask = plan(batch)
            encoded, labels, mask = screened.read(indices, mask)
            yield np.asarray(encoded, dtype=object), labels, params, mask

    signature = (
        tf.TensorSpec([local], tf.string),
        tf.TensorSpec([local], tf.int32),
        tf.TensorSpec([local, _NUM_AUGMENT_PARAMS], tf.float32),
        tf.TensorSpec([local], tf.float32),
    )
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.unbatch().map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)
