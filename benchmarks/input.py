"""Host input pipeline throughput: JPEG decode + random crop at 256, folder and TFDS paths.

    python benchmarks/input.py [--images=256] [--batch=64] [--batches=20] [--paths=folder,tfds]
        [--epoch_timing] [--corrupt=FRACTION]

Writes `--images` JPEGs of `--width` x `--height` (512x384, quality 90) cut from the bundled
photographs (random crops of 40-100% of a photo, resized, mirrored at random) into a temporary
folder, then times the project's training input (`vitvq.data.train_batches`, the tf.data
pipeline the trainers use: read, decode, resize the shorter side to `--size`, random crop,
random mirror, batch) for

- `folder`: `dataset.name=folder` over that folder;
- `tfds`: the same JPEGs built into a TFDS dataset in the array_record format (as ImageNet is
  prepared for vitvq), read through `dataset.name=tfds`.

The first `--warmup` batches are not timed (TensorFlow start-up, first reads). Reports
images/s and images/s per core (`os.sched_getaffinity`: the cores this process may use,
which tf.data's autotuned parallelism spreads over). The top-level `images_per_sec_per_core`
is the slower path's. One JSON object is the last line. Needs TensorFlow (and
tensorflow-datasets for the tfds path): it measures the CPU host, not an accelerator.

Broken files (`--corrupt=FRACTION`, folder path only): after the JPEGs are written, that
fraction of the images (chosen with a fixed seed, one in each of equal stretches of the
training files, so spread over the folder) is replaced by broken files, cycling over four
kinds: an empty file; a truncated JPEG (its first half); a text file named .jpg; and a JPEG
with a second start-of-frame marker written over the middle of its entropy-coded data (it
still ends with the end-of-image marker, so only TensorFlow's decoder finds it: "Invalid JPEG
file structure: two SOF markers", which costs a rebuild of the tf.data pipeline). The first
three kinds are found from the bytes (`vitvq.data.screen.sniff`). The JSON adds
`corrupt_fraction`, `corrupt_files` and `skipped_images` (`screen.skipped_images()`: the
unreadable files the pipeline found and skipped).

`--epoch_timing` (folder and tfds): no untimed warmup batches; the first pass over the
training split, ceil(training images / batch) batches from the start of the pipeline (where
broken files are discovered), is timed on its own as `first_epoch_images_per_sec` (with
`first_epoch_seconds` and `epoch_batches`; `startup_seconds` then equals
`first_epoch_seconds`), then `--batches` later batches as usual (`images_per_sec`). The
cost of 5% broken files in a 10k-image folder:

    python benchmarks/input.py --paths=folder --images=10000 --width=320 --height=256 \
        --batch=64 --epoch_timing --corrupt=0.05     # and the same with --corrupt=0
"""

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PATHS = ("folder", "tfds")
CORRUPTIONS = ("empty", "truncated_jpeg", "text_named_jpg", "jpeg_two_sof_markers")


def write_jpegs(root: pathlib.Path, count: int, width: int, height: int, seed: int = 0):
    """`count` JPEGs of width x height cut from the bundled photos; returns their paths."""
    from PIL import Image

    from vitvq.data import sources

    photos = [sources.load_photo(n) for n in (*sources.PHOTOS_TRAIN, *sources.PHOTOS_EVAL)]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        scale = rng.uniform(0.4, 1.0)
        ch = max(8, int(min(h, w * height / width) * scale))
        cw = max(8, int(ch * width / height))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        crop = crop.resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / f"{i:05d}.jpg"
        crop.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _entropy_coded_start(data: bytes) -> int:
    """Offset of the first byte after the last start-of-scan segment of a JPEG."""
    sos = data.rfind(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def broken_bytes(kind: str, data: bytes) -> bytes:
    """A broken version of the JPEG `data` of one of the CORRUPTIONS kinds."""
    if kind == "empty":
        return b""
    if kind == "truncated_jpeg":
        return data[: len(data) // 2]
    if kind == "text_named_jpg":
        return b"<html><body>404 Not Found</body></html>\n"
    if kind == "jpeg_two_sof_markers":
        # A second SOF0 marker (with a length) over the middle of the scan data: libjpeg stops
        # with "two SOF markers". The file keeps its end-of-image marker after the scan.
        start = _entropy_coded_start(data)
        middle = (start + len(data) - 2) // 2
        marker = b"\xff\xc0\x00\x11"
        return data[:middle] + marker + data[middle + len(marker) :]
    raise ValueError(f"unknown corruption {kind!r}")


def corrupt_files(train_files: list[str], count: int, seed: int = 0) -> dict[str, str]:
    """Replaces `count` of `train_files` by broken files, one chosen at random in each of
    `count` equal stretches of the (sorted) list, cycling over CORRUPTIONS; returns
    {path: kind}."""
    rng = np.random.default_rng(seed)
    files = sorted(train_files)
    edges = np.linspace(0, len(files), count + 1).astype(int)
    broken = {}
    for i in range(count):
        path = files[int(rng.integers(edges[i], edges[i + 1]))]
        kind = CORRUPTIONS[i % len(CORRUPTIONS)]
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(broken_bytes(kind, data))
        broken[path] = kind
    return broken


def build_tfds(files, data_dir: str) -> str:
    """The JPEGs as a TFDS dataset `vitvq_bench_jpegs` in array_record format (bytes kept)."""
    import tensorflow_datasets as tfds

    class VitvqBenchJpegs(tfds.core.GeneratorBasedBuilder):
        """JPEGs written by benchmarks/input.py."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=1),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(files),
                "validation": self._generate_examples(files[:4]),
            }

        def _generate_examples(self, paths):
            for i, path in enumerate(paths):
                yield i, {"image": str(path), "label": 0}

    tfds.disable_progress_bar()
    builder = VitvqBenchJpegs(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.name


def dataset_config(path: str, root: str, data_dir: str, tfds_name: str | None) -> dict:
    base = dict(train_split="train", eval_split="validation", num_classes=0, random_flip=True)
    if path == "folder":
        return dict(base, name="folder", path=root, eval_fraction=0.01)
    return dict(base, name="tfds", tfds_name=tfds_name, data_dir=data_dir)


def folder_train_files(root: str) -> list[str]:
    """The files of a folder that the pipeline trains on (the held-out ones excluded)."""
    from vitvq.data import records

    base = dataset_config("folder", root, "", None)
    source = records.FolderSource(
        root,
        train_split=base["train_split"],
        eval_split=base["eval_split"],
        eval_fraction=base["eval_fraction"],
    )
    return [source.describe("train", i) for i in range(source.size("train"))]


def time_path(config: dict, args, train_images: int) -> dict:
    from vitvq import data

    t = time.perf_counter()
    batches = data.train_batches(config, image_size=args.size, global_batch_size=args.batch, seed=0)
    epoch = {}
    if args.epoch_timing:
        # From the start of the pipeline, one pass over the training split timed on its own
        # (where broken files are found), then `--batches` later batches.
        num_batches = math.ceil(train_images / args.batch)
        for _ in range(num_batches):
            batch = next(batches)
        epoch_s = time.perf_counter() - t
        epoch = {
            "epoch_batches": num_batches,
            "first_epoch_seconds": round(epoch_s, 2),
            "first_epoch_images_per_sec": round(num_batches * args.batch / epoch_s, 1),
        }
    else:
        for _ in range(args.warmup):
            batch = next(batches)
    startup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - t
    assert batch["image"].shape == (args.batch, args.size, args.size, 3)
    images_per_sec = args.batches * args.batch / seconds
    cores = len(os.sched_getaffinity(0))
    return {
        "images_per_sec": round(images_per_sec, 1),
        "images_per_sec_per_core": round(images_per_sec / cores, 1),
        "startup_seconds": round(startup_s, 2),
        "timed_seconds": round(seconds, 2),
        **epoch,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs written")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--size", type=int, default=256, help="crop size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per path")
    parser.add_argument(
        "--paths", default=None, help=f"default: {','.join(PATHS)} (folder with --corrupt)"
    )
    parser.add_argument(
        "--corrupt",
        type=float,
        default=0.0,
        help="fraction of the images replaced by broken files (folder path only)",
    )
    parser.add_argument(
        "--epoch_timing",
        action="store_true",
        help="time the first pass over the data on its own (no warmup batches)",
    )
    args = parser.parse_args()
    if not 0.0 <= args.corrupt < 1.0:
        parser.error("--corrupt must be in [0, 1)")
    if args.paths is None:
        args.paths = "folder" if args.corrupt > 0 else ",".join(PATHS)
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths must list some of {PATHS}")
    if args.corrupt > 0 and paths != ["folder"]:
        parser.error("--corrupt needs --paths=folder (broken files go into the folder only)")
    if min(args.width, args.height) < args.size:
        parser.error("--width and --height must be at least --size")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vitvq.data import screen

    with tempfile.TemporaryDirectory(prefix="vitvq_input_") as tmp:
        root = pathlib.Path(tmp) / "jpegs"
        t = time.perf_counter()
        files = write_jpegs(root, args.images, args.width, args.height)
        write_s = time.perf_counter() - t
        jpeg_bytes = sum(f.stat().st_size for f in files)
        data_dir = str(pathlib.Path(tmp) / "tfds")
        tfds_name = None
        build_s = None
        if "tfds" in paths:
            t = time.perf_counter()
            tfds_name = build_tfds(files, data_dir)
            build_s = round(time.perf_counter() - t, 2)
        train_images = {"tfds": len(files)}
        broken = {}
        if "folder" in paths:
            train_files = folder_train_files(str(root))
            train_images["folder"] = len(train_files)
            if args.corrupt > 0:
                count = min(len(train_files), round(args.corrupt * args.images))
                broken = corrupt_files(train_files, count)
                kinds = {k: list(broken.values()).count(k) for k in CORRUPTIONS}
                print(f"replaced {len(broken)} of {len(files)} JPEGs: {kinds}", file=sys.stderr)
        results = {
            p: time_path(dataset_config(p, str(root), data_dir, tfds_name), args, train_images[p])
            for p in paths
        }

    result = {
        "benchmark": "input",
        "images": args.images,
        "jpeg": f"{args.width}x{args.height}",
        "mean_jpeg_bytes": int(jpeg_bytes / len(files)),
        "crop": args.size,
        "batch": args.batch,
        "timed_batches": args.batches,
        "cores": len(os.sched_getaffinity(0)),
        "write_seconds": round(write_s, 2),
        "tfds_build_seconds": build_s,
        **{f"{p}": r for p, r in results.items()},
        "images_per_sec_per_core": min(r["images_per_sec_per_core"] for r in results.values()),
        "corrupt_fraction": args.corrupt,
        "corrupt_files": len(broken),
        "skipped_images": screen.skipped_images(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
