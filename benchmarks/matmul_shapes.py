"""What the matrix products of a ViT stage-1 step can reach on this machine, shape by shape.

    python benchmarks/matmul_shapes.py [--width=256] [--mlp=1024] [--heads=4] [--tokens=64]
        [--batch=32] [--depth=4] [--codebook=8192] [--code_dim=32]

MFU in `train_step.py` divides by the rate of one large (2048^3) float32 product. The step's
own products are smaller: [batch x tokens, width] times [width, width] or [width, mlp], and
per image and head [tokens, head_dim] times [head_dim, tokens] for attention. This script
times each of those shapes alone (jitted, float32, best of several runs), with the backward
pass's two products per forward one (dX = dY W^T, dW = X^T dY), and the code search
([batch x tokens, code_dim] x [code_dim, codebook]). It reports each shape's GFLOP/s, its
fraction of the 2048^3 peak, and `bound_seconds`: the time the step's products would take if
each ran at its measured stand-alone rate. That is a shape-aware lower bound on the step time
and `bound_mfu` the MFU it implies, against which `train_step.py`'s measured MFU can be read.
One JSON object is the last line.
"""

import argparse
import json
import time


def rate(jax, jnp, fn, *shapes, repeats: int = 7) -> float:
    """Seconds of one call of jitted `fn` on float32 arrays of `shapes` (best of repeats)."""
    keys = jax.random.split(jax.random.key(0), len(shapes))
    args = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]
    f = jax.jit(fn)
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (
        ("width", 256),
        ("mlp", 1024),
        ("heads", 4),
        ("tokens", 64),
        ("batch", 32),
        ("depth", 4),
        ("codebook", 8192),
        ("code_dim", 32),
        ("peak_size", 2048),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    n = args.batch * args.tokens  # rows of every token-wise product
    w, m, h = args.width, args.mlp, args.heads
    d = w // h
    mm = lambda a, b: a @ b  # noqa: E731
    mm_t = lambda a, b: a.T @ b  # noqa: E731  (weight gradients: X^T dY)
    attn = lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k)  # noqa: E731

    s = args.peak_size
    peak = 2 * s**3 / rate(jax, jnp, mm, (s, s), (s, s))
    # (name, flops of one call, seconds, calls per step): per transformer block, forward
    # products (q, k, v, out: 4 of [n, w] x [w, w]; MLP: [n, w] x [w, m] and [n, m] x [m, w]),
    # and for each its two backward products; both stacks (encoder and decoder).
    blocks = 2 * args.depth
    shapes = [
        ("x[n,w] @ W[w,w]", 2 * n * w * w, rate(jax, jnp, mm, (n, w), (w, w)), 4 * 2 * blocks),
        ("x^T[w,n] @ dy[n,w]", 2 * n * w * w, rate(jax, jnp, mm_t, (n, w), (n, w)), 4 * blocks),
        ("x[n,w] @ W[w,m]", 2 * n * w * m, rate(jax, jnp, mm, (n, w), (w, m)), 2 * blocks),
        ("h[n,m] @ W[m,w]", 2 * n * w * m, rate(jax, jnp, mm, (n, m), (m, w)), 2 * blocks),
        ("x^T[w,n] @ dh[n,m]", 2 * n * w * m, rate(jax, jnp, mm_t, (n, w), (n, m)), blocks),
        ("h^T[m,n] @ dy[n,w]", 2 * n * w * m, rate(jax, jnp, mm_t, (n, m), (n, w)), blocks),
        (
            "attention q k^T per image and head",
            2 * args.batch * h * args.tokens**2 * d,
            rate(
                jax, jnp, attn, (args.batch * h, args.tokens, d), (args.batch * h, args.tokens, d)
            ),
            6 * blocks,  # scores and p @ v, forward and two backward products each
        ),
        (
            "code search z[n,c] @ E[c,K]",
            2 * n * args.codebook * args.code_dim,
            rate(jax, jnp, mm, (n, args.code_dim), (args.code_dim, args.codebook)),
            1,
        ),
    ]
    rows, bound, flops = [], 0.0, 0.0
    for name, f, seconds, calls in shapes:
        rows.append(
            {
                "product": name,
                "gflop": round(f / 1e9, 4),
                "gflop_per_sec": round(f / seconds / 1e9, 1),
                "fraction_of_peak": round(f / seconds / peak, 3),
                "calls_per_step": calls,
            }
        )
        bound += calls * seconds
        flops += calls * f
    result = {
        "peak_flops_per_sec": round(peak),
        "products": rows,
        "product_flops_per_step": flops,
        "bound_seconds": round(bound, 4),
        "bound_mfu": round(flops / bound / peak, 3),
        "device": str(jax.devices()[0].device_kind),
    }
    for row in rows:
        print(
            f"{row['product']:38s} {row['gflop_per_sec']:8.1f} GFLOP/s "
            f"({row['fraction_of_peak']:.2f} of peak) x{row['calls_per_step']}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
