"""Host input pipeline throughput: JPEG decode + random crop at 256, folder and TFDS paths.

    python benchmarks/input.py [--images=256] [--batch=64] [--batches=20] [--paths=folder,tfds]

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
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PATHS = ("folder", "tfds")


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


def time_path(config: dict, args) -> dict:
    from vitvq import data

    t = time.perf_counter()
    batches = data.train_batches(config, image_size=args.size, global_batch_size=args.batch, seed=0)
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
    parser.add_argument("--paths", default=",".join(PATHS))
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths must list some of {PATHS}")
    if min(args.width, args.height) < args.size:
        parser.error("--width and --height must be at least --size")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
        results = {
            p: time_path(dataset_config(p, str(root), data_dir, tfds_name), args) for p in paths
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
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
