"""What the checkpoint digest records cost, on a state the size of the 102M-parameter model.

    python benchmarks/checkpoint_digests.py [--params=102_000_000] [--dir=/tmp/digests]

Saves a train-state-like tree (parameters plus Adam's two moments, float32: 3 x N floats)
with `vitvq.checkpoint.Checkpointer`, then times, on the committed step: writing its digest
record (`vitvq.digests.write`, what each save adds once it commits), checking it
(`vitvq.digests.check`, what a restart or export adds), and a restore for comparison. Prints
one JSON object as its last line.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=102_000_000)
    parser.add_argument("--dir", default="/tmp/vitvq_digest_benchmark")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitvq import digests
    from vitvq.checkpoint import Checkpointer

    shutil.rmtree(args.dir, ignore_errors=True)
    rows = 1024
    cols = -(-args.params // rows)
    rng = np.random.default_rng(0)
    leaf = lambda: jnp.asarray(rng.standard_normal((rows, cols), np.float32))  # noqa: E731
    state = {"params": leaf(), "mu": leaf(), "nu": leaf(), "step": jnp.int32(1)}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    directory = os.path.join(args.dir, "checkpoints")
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        start = time.perf_counter()
        ckpt.save(1, state)
        ckpt.wait()  # the write and, once committed, the record
        save_total = time.perf_counter() - start
    step_dir = os.path.join(directory, "1")
    size = sum(p.stat().st_size for p in pathlib.Path(step_dir).rglob("*") if p.is_file())
    start = time.perf_counter()
    digests.write(step_dir)
    write_seconds = time.perf_counter() - start
    start = time.perf_counter()
    assert digests.check(step_dir) is None
    check_seconds = time.perf_counter() - start
    with Checkpointer(directory, save_every_steps=1, read_only=True) as ckpt:
        start = time.perf_counter()
        ckpt.restore(abstract, 1)
        restore_seconds = time.perf_counter() - start
    shutil.rmtree(args.dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "params": rows * cols,
                "checkpoint_bytes": size,
                "save_with_record_seconds": round(save_total, 4),
                "record_seconds": round(write_seconds, 4),
                "check_seconds": round(check_seconds, 4),
                "restore_seconds": round(restore_seconds, 4),
                "hash_gb_per_second": round(size / check_seconds / 1e9, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
