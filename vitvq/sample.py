"""python -m vitvq.sample --bundle=BUNDLE --num_samples=16 --output=grid.png
    [--class_label=N[,M...]] [--temperature=1.0] [--top_k=0] [--top_p=1.0] [--cfg_scale=1.0]
    [--seed=0] [--acceptance_rate=0.5 --classifier=inception_fid.safetensors
    [--classifier_classes=MAP]]

Samples images from a bundle's VIM and writes them as one PNG grid. A class-conditional VIM
gives one row per class label (every class when --class_label is not given; --num_samples
images per row); an unconditional one gives --num_samples images in rows of 8. Progress is
shown per row. Bad arguments print one `error:` line and exit with status 2.

--acceptance_rate below 1 turns on classifier-based rejection (`vitvq.rejection`): for every
row, num_samples / rate candidates are drawn and the ones the classifier finds most like the
row's class are kept, best first. The classifier is the FID InceptionV3 from the weights file
that scripts/convert_inception_weights.py writes (1008 ImageNet outputs); --classifier_classes
maps the bundle's classes onto its outputs: a JSON list of output indices, or the Inception
graph's label map (`target_class` / `target_class_string` entries) matched by class name.
"""

from __future__ import annotations

from absl import app, flags

from vitvq import cli, quiet
from vitvq.errors import InputError


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"--class_label must be an integer or comma-separated integers, got {text!r}"
        ) from None


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module
    for its functions never clashes with another program's flags)."""
    flags.DEFINE_string("bundle", None, "A bundle with a VIM (python -m vitvq.export).")
    flags.DEFINE_integer("num_samples", 16, "Images per class row (or in all, unconditional).")
    flags.DEFINE_string("output", None, "The PNG file to write.")
    flags.DEFINE_string("class_label", None, "Class id(s), comma-separated (default: all).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely codes (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = all).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_integer("seed", 0, "Random seed (same seed, same images).")
    flags.DEFINE_float("acceptance_rate", 1.0, "Keep this best fraction of candidates (0, 1].")
    flags.DEFINE_string("classifier", None, "FID InceptionV3 safetensors that scores samples.")
    flags.DEFINE_string("classifier_classes", None, "Class map: JSON list or label map file.")


def rejection_knobs(sampler, rate: float, classifier: str | None, classes: str | None) -> dict:
    """Sampler keywords for rejection, checked before anything is drawn."""
    # deferred: NumPy; keeps --help and flag errors fast
    from vitvq import rejection

    rate = rejection.check_rate(rate)
    if classifier is None:
        if rate < 1.0:
            raise InputError("--acceptance_rate below 1 needs --classifier=WEIGHTS.safetensors")
        if classes is not None:
            raise InputError("--classifier_classes needs --classifier")
        return {}
    if not sampler.num_classes:
        raise InputError("--classifier needs a class-conditional VIM; this one is unconditional")
    class_map = None
    if classes is not None:
        class_map = rejection.read_class_map(classes, sampler.class_names)
    model = rejection.inception_classifier(classifier)
    rejection.check_class_map(model.num_classes, sampler.num_classes, class_map)
    return {"acceptance_rate": rate, "classifier": model, "class_map": class_map}


def main(argv):
    cli.no_extra_args(argv)
    cli.require_flags("bundle", "output")
    quiet.startup()
    with cli.user_errors():
        # deferred: JAX, NumPy and PIL; keeps --help and flag errors fast
        from vitvq.pictures import save_png
        from vitvq.sampler import load_sampler, sample_grid

        labels = _parse_labels(flags.FLAGS.class_label)
        sampler = load_sampler(flags.FLAGS.bundle)
        knobs = rejection_knobs(
            sampler,
            flags.FLAGS.acceptance_rate,
            flags.FLAGS.classifier,
            flags.FLAGS.classifier_classes,
        )
        grid = sample_grid(
            sampler,
            num_samples=flags.FLAGS.num_samples,
            labels=labels,
            seed=flags.FLAGS.seed,
            temperature=flags.FLAGS.temperature,
            top_k=flags.FLAGS.top_k,
            top_p=flags.FLAGS.top_p,
            cfg_scale=flags.FLAGS.cfg_scale,
            **knobs,
        )
        save_png(flags.FLAGS.output, grid)
        print(f"wrote {flags.FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
