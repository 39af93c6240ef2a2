"""Does a paper-scale stage-1 config train stably with its full loss? The SS config shrunk
only in data, as a pod user first meets it:

    python benchmarks/stability.py --workdir=DIR [--steps=150] [--window=30]
        [--config=configs/vitvq_small.py] [--set=loss.disc_start_fraction=0 ...]

runs `python -m vitvq.main --config=CONFIG --config.dataset.name=photos
--config.dataset.num_classes=0 --config.image_size=64 --config.batch_size=16
--config.total_steps=STEPS` (LPIPS, logit-Laplace and the StyleGAN2 discriminator as the
config has them; metrics logged at every step so that each window's mean is over all of its
steps), then prints, for each `--window`-step window, the mean L2 loss, the mean and range of
the discriminator's loss and the mean distinct codes per batch; then whether the L2 mean
never rose from one window to the next and whether the last batch used at least half as
many distinct codes as it has tokens. `--summarize` reads an existing workdir instead of
training. The last line printed is one JSON object.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = [
    "--config.dataset.name=photos",
    "--config.dataset.num_classes=0",
    "--config.image_size=64",
    "--config.batch_size=16",
]


def train(args) -> float:
    argv = [
        sys.executable,
        "-m",
        "vitvq.main",
        f"--config={args.config}",
        f"--workdir={args.workdir}",
        *DATA,
        f"--config.total_steps={args.steps}",
        "--config.log_every_steps=1",
        *(f"--config.{s}" for s in args.set),
    ]
    print(" ".join(argv[1:]), flush=True)
    start = time.time()
    subprocess.run(argv, cwd=ROOT, check=True)
    return time.time() - start


def summarize(workdir, window: int, tokens: int) -> dict:
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    train_rows = {r["step"]: r for r in rows if "train/loss/l2" in r}
    steps = sorted(train_rows)
    table = []
    for lo in range(0, steps[-1], window):
        chunk = [train_rows[s] for s in steps if lo < s <= lo + window]
        if not chunk:
            continue
        disc = [r["train/disc/loss"] for r in chunk if "train/disc/loss" in r]
        table.append(
            dict(
                steps=f"{lo + 1}-{lo + window}",
                l2=sum(r["train/loss/l2"] for r in chunk) / len(chunk),
                disc=(sum(disc) / len(disc), min(disc), max(disc)) if disc else None,
                codes=sum(r["train/vq/codes_used"] for r in chunk) / len(chunk),
            )
        )
    for row in table:
        if row["disc"] is None:
            disc = "GAN off"
        else:
            mean, lo, hi = row["disc"]
            disc = f"disc {mean:.3f} ({lo:.2f}-{hi:.2f})"
        print(f"steps {row['steps']:>9}: L2 {row['l2']:.4f}  {disc}  codes {row['codes']:.0f}")
    l2 = [row["l2"] for row in table]
    never_rose = all(b <= a for a, b in zip(l2, l2[1:], strict=False))
    last_codes = train_rows[steps[-1]]["train/vq/codes_used"]
    half = "at least" if 2 * last_codes >= tokens else "under"
    print(
        f"L2 window means never rose: {never_rose}; distinct codes in the last batch: "
        f"{last_codes:.0f} of {tokens} tokens ({half} half)"
    )
    return dict(
        l2_windows=[round(v, 5) for v in l2],
        never_rose=never_rose,
        last_codes=last_codes,
        tokens=tokens,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "vitvq_small.py"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    parser.add_argument("--summarize", action="store_true", help="read WORKDIR, train nothing")
    args = parser.parse_args()
    seconds = None if args.summarize else train(args)
    tokens = 16 * (64 // 8) ** 2  # batch 16 of 64x64 images in 8x8 patches
    result = summarize(args.workdir, args.window, tokens)
    result.update(seconds=seconds, overrides=args.set, steps=args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
