"""python -m vitvq.probe --bundle=BUNDLE --dataset=NAME [--path=DIR] [--tfds_name=NAME]
                        [--block=N] [--workdir=DIR] [--batch_size=64]
                        [--num_train=N] [--num_eval=N] [--output=probe.json]

The linear probe of a bundle's VIM (the paper's image-understanding result) on a labelled
dataset: the token-averaged output of one VIM block (default: the paper's, 10 of 24 or 15 of
36; the middle block otherwise), with the null class in the class slot for a
class-conditional VIM, as features of the center crops of the training and evaluation splits;
then a softmax classifier trained with optax, its L2 weight decay chosen on a held-out tenth
of the training features (`vitvq.evaluation.linear_probe.softmax_probe`).

Images are read, tokenized and featurized one batch at a time, split over the local devices,
and never all held: only the features ([N, width] float32) are kept. With --workdir every
batch's features are written there as it is done (atomically), so a run that is stopped at
any point resumes where it was, reusing them; a workdir that holds another probe's features
(another bundle, block, dataset or batch size) is refused. Prints the top-1 on the evaluation
split and one JSON object as the last line. Bad arguments print one `error:` line and exit 2.
The work is the library's `vitvq.evaluation.bundle_probe.probe_bundle`.
"""

from __future__ import annotations

import json

from absl import app, flags

from vitvq import cli, quiet


def define_flags() -> None:
    flags.DEFINE_string("bundle", None, "A bundle with a VIM (python -m vitvq.export).")
    flags.DEFINE_enum(
        "dataset", None, ["digits", "photos", "folder", "tfds", "synthetic"], "Dataset source."
    )
    flags.DEFINE_string("path", None, "Root directory of a folder dataset.")
    flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS dataset name.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("split", "validation", "Evaluation split (folder/tfds).")
    flags.DEFINE_integer("block", None, "VIM block to probe, 1-based (default: the paper's).")
    flags.DEFINE_string("workdir", None, "Where features are cached (resumable runs).")
    flags.DEFINE_integer("batch_size", 64, "Images per batch.")
    flags.DEFINE_integer("num_train", None, "Use the first N training examples only.")
    flags.DEFINE_integer("num_eval", None, "Use the first N evaluation examples only.")
    flags.DEFINE_string("output", None, "Write the result JSON here too.")


def main(argv):
    cli.no_extra_args(argv)
    cli.require_flags("bundle", "dataset")
    f = flags.FLAGS
    quiet.startup()
    with cli.user_errors():
        # deferred: JAX, NumPy and PIL; keeps --help and flag errors fast
        from vitvq.evaluation.bundle_probe import probe_bundle

        result = probe_bundle(
            f.bundle,
            cli.dataset_config(
                f.dataset, path=f.path, tfds_name=f.tfds_name, data_dir=f.data_dir, split=f.split
            ),
            block=f.block,
            workdir=f.workdir,
            batch_size=f.batch_size,
            num_train=f.num_train,
            num_eval=f.num_eval,
        )
        print(
            f"linear probe, VIM block {result['block']} of {result['depth']}: top-1 "
            f"{result['top1']:.4f} on {result['num_test']} evaluation images (weight decay "
            f"{result['weight_decay']:g}, chosen on {result['held_out_top1']:.4f} held-out top-1)"
        )
        text = json.dumps(result)
        if f.output:
            with open(f.output, "w") as out:
                out.write(text + "\n")
        print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
