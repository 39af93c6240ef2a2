"""python -m vitvq.evaluate --bundle=BUNDLE --dataset=NAME [--path=DIR] [--tfds_name=NAME]
                           [--num_examples=N] [--batch_size=64] [--inception_weights=FILE]
                           [--no_lpips] [--output=metrics.json]

Evaluates a bundle's tokenizer on a dataset's evaluation split (the same center crops the
training loop evaluates on): PSNR, SSIM, LPIPS, L1/L2, codebook usage and perplexity over the
set and per batch, and FID/IS of the reconstructions against the originals when InceptionV3
weights are given (see scripts/convert_inception_weights.py; without them FID is skipped).
Prints one JSON object as the last line and writes it to --output when given.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from vitvq import cli, console, quiet
from vitvq.cli import dataset_config
from vitvq.errors import InputError

_BUNDLE = flags.DEFINE_string("bundle", None, "The bundle whose tokenizer is evaluated.")
_DATASET = flags.DEFINE_enum(
    "dataset", None, ["digits", "photos", "folder", "tfds", "synthetic"], "Dataset source."
)
_PATH = flags.DEFINE_string("path", None, "Root directory of a folder dataset.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_SPLIT = flags.DEFINE_string("split", "validation", "Evaluation split (folder/tfds).")
_NUM = flags.DEFINE_integer("num_examples", None, "Evaluate the first N examples only.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_INCEPTION = flags.DEFINE_string(
    "inception_weights", None, "InceptionV3 weights (safetensors) for FID/IS."
)
_NO_LPIPS = flags.DEFINE_bool("no_lpips", False, "Skip LPIPS.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the metrics JSON here too.")


def run(bundle_path: str, dataset: dict, **options) -> dict[str, float]:
    # deferred: JAX, NumPy and PIL; keeps --help and flag errors fast
    from vitvq import data as data_lib
    from vitvq.evaluation import fid as fid_lib
    from vitvq.evaluation.tokenizer_eval import evaluate_tokenizer
    from vitvq.models.perceptual import lpips_fn
    from vitvq.tokenizer import load_tokenizer

    batch_size = int(options.get("batch_size", 64))
    if batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {batch_size}")
    tok = load_tokenizer(bundle_path)
    lpips = None
    if not options.get("no_lpips"):
        lpips = lpips_fn()
    inception = None
    if options.get("inception_weights"):
        inception = fid_lib.load_inception(options["inception_weights"])
    else:
        print(fid_lib.FID_WEIGHTS_HELP, file=sys.stderr)
    num_examples = options.get("num_examples")
    with data_lib.sources_kept():  # a folder is listed once
        batches = data_lib.eval_batches(
            dataset,
            image_size=tok.image_size,
            global_batch_size=batch_size,
            num_examples=num_examples,
        )
        total = data_lib.dataset_info(dataset)["num_eval"]
    total = min(total, num_examples) if num_examples else total
    return evaluate_tokenizer(tok, _counted(batches, total), lpips=lpips, inception=inception)


def _counted(batches, total: int):
    """`batches`, with a progress line (images done of `total`, ETA) on a terminal."""
    # deferred: NumPy; keeps --help and flag errors fast
    import numpy as np

    progress = console.Progress("evaluating", total, stream=sys.stderr)
    done = 0
    try:
        for batch in batches:
            yield batch
            real = batch.get("mask")
            done += int(np.sum(real)) if real is not None else len(batch["image"])
            progress.update(min(done, total))
    finally:
        progress.close()


def main(argv):
    cli.no_extra_args(argv)
    cli.require_flags("bundle", "dataset")
    quiet.startup()
    with cli.user_errors():
        result = run(
            _BUNDLE.value,
            dataset_config(
                _DATASET.value,
                path=_PATH.value,
                tfds_name=_TFDS_NAME.value,
                data_dir=_DATA_DIR.value,
                split=_SPLIT.value,
            ),
            num_examples=_NUM.value,
            batch_size=_BATCH.value,
            inception_weights=_INCEPTION.value,
            no_lpips=_NO_LPIPS.value,
        )
        text = json.dumps({k: round(v, 6) for k, v in sorted(result.items())})
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
