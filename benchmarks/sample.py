"""Speed of the jitted KV-cache sampler (vitvq.sampling.sample_tokens).

    python benchmarks/sample.py --preset=cpu_sampler --tokens=256 --batch=4
    python benchmarks/sample.py --width=512 --depth=8 --vocab=8192 --tokens=1024 --batch=4
    python benchmarks/sample.py --preset=vim_base --tokens=1024 --batch=64 --dtype=bfloat16  # GPU

Builds an unconditional VIM with random weights (no training needed for speed), compiles the
sampler once, then times whole sampling runs. Reports tokens/s (batch x tokens per second),
and per decoding step the bytes it must read at least (all weights once, plus the KV cache
blocks up to the step's slot, `--cache_block`, or the whole cache without blocks) against
the machine's memory read bandwidth measured in the same process (a sum over a 256 MiB
array), as `bandwidth_fraction`. `--dtype` is the compute dtype (weights stay float32, the
cache takes the compute dtype). Needs neither TensorFlow, ml_collections nor clu. One JSON
object is the last line.
"""

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PRESETS = {
    # issue 7 target 2 / issue 5's measurement: 8 layers, 512 wide, vocab 8192
    "cpu_sampler": dict(width=512, depth=8, heads=8, mlp=2048, vocab=8192),
    # VIM-Base (docs/paper.md table 2) over 8192 codes: issue 7's GPU suite, 1024 tokens, batch 64
    "vim_base": dict(width=1536, depth=24, heads=16, mlp=6144, vocab=8192),
    "tiny": dict(width=64, depth=2, heads=2, mlp=128, vocab=512),
}


def read_bandwidth(jax, jnp, nbytes: int = 1 << 28) -> float:
    """Bytes/s of streaming a large array from memory once (a sum over 256 MiB: what reading
    the weights needs; a copy would also pay for page faults on its fresh output)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu_sampler")
    parser.add_argument("--tokens", type=int, default=256, help="a square number")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--cache_block",
        type=int,
        default=None,
        help="KV cache block (default vitvq.sampling.CACHE_BLOCK; 0: one fixed-length cache)",
    )
    for key in ("width", "depth", "heads", "mlp", "vocab"):
        parser.add_argument(f"--{key}", type=int, default=None)
    args = parser.parse_args()
    shape = dict(PRESETS[args.preset])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    grid = math.isqrt(args.tokens)
    if grid * grid != args.tokens:
        parser.error(f"--tokens must be a square number, got {args.tokens}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitvq import sampling
    from vitvq.models.vim import build_vim

    cfg = dict(
        width=shape["width"],
        depth=shape["depth"],
        num_heads=shape["heads"],
        mlp_dim=shape["mlp"],
        dropout=0.0,
    )
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = build_vim(cfg, vocab_size=shape["vocab"], grid_size=grid, dtype=dtype)
    params = model.init(jax.random.key(0), jnp.zeros((1, args.tokens), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))

    if args.cache_block is not None:
        sampling.CACHE_BLOCK = args.cache_block
    block = sampling.CACHE_BLOCK
    if not block or args.tokens <= block or args.tokens % block:
        block = 0  # the sampler uses one fixed-length cache

    def run(seed):
        return sampling.sample_tokens(
            model, params, jax.random.key(seed), batch_size=args.batch, temperature=1.0
        )

    t = time.perf_counter()
    np.asarray(run(0))
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        np.asarray(run(i + 1))
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    steps = args.tokens
    head_dim = shape["width"] // shape["heads"]
    # The step at slot t reads the cache blocks up to t's (keys and values, all layers); with
    # one fixed-length cache, all of it.
    itemsize = jnp.dtype(dtype).itemsize
    slot_bytes = 2 * shape["depth"] * args.batch * shape["heads"] * head_dim * itemsize
    t_total = args.tokens
    read = [((t // block + 1) * block if block else t_total) for t in range(1, t_total)]
    bytes_per_step = param_bytes + slot_bytes * float(np.mean(read))
    bandwidth = read_bandwidth(jax, jnp)
    step_s = seconds / steps
    result = {
        "preset": args.preset,
        **shape,
        "tokens": args.tokens,
        "batch": args.batch,
        "dtype": args.dtype,
        "cache_block": block,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "compile_seconds": round(compile_s, 2),
        "seconds_per_sample_batch": round(seconds, 3),
        "tokens_per_sec": round(args.batch * args.tokens / seconds, 1),
        "step_ms": round(1e3 * step_s, 3),
        "bytes_per_step": int(bytes_per_step),
        "bandwidth_bytes_per_sec": round(bandwidth),
        "bandwidth_fraction": round(bytes_per_step / step_s / bandwidth, 3),
        "device": str(jax.devices()[0].device_kind),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
