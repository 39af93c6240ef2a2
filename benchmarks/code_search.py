"""The quantizer's nearest-code search, chunked against unchunked: time and compiled memory.

    python benchmarks/code_search.py                       # 8 images of 256x256: 8192 tokens
    python benchmarks/code_search.py --tokens=1024 --codes=8192 --dim=32 --chunk=1024

`vitvq.models.quantizer.nearest_code` compares the l2-normalized tokens [N, D] with the
codebook [K, D] a chunk of codes at a time (`search_chunk_size`, a `lax.scan`), so the
[N x K] similarity matrix never exists whole; with chunk 0 it is one matmul and an argmax
over the whole matrix. The default shape is issue 7's target: 256x256 images, batch 8 per
device (8 x 1024 = 8192 tokens), 8192 codes of 32 dimensions, chunks of 1024 codes.

For each variant: the median time of a jitted search (float32, random unit vectors), and the
compiled memory analysis (temporary bytes: what the search allocates beyond its inputs and
output) next to the bytes of the whole [N x K] float32 matrix. Checks that both give the same
indices. `holds_full_matrix` is true when the temporaries could hold the whole matrix. One
JSON object is the last line. Needs neither TensorFlow, ml_collections nor clu.
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 1024, help="N: images x tokens each")
    parser.add_argument("--codes", type=int, default=8192, help="K: codebook size")
    parser.add_argument("--dim", type=int, default=32, help="D: code dimension")
    parser.add_argument("--chunk", type=int, default=1024, help="codes per chunk")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not 0 < args.chunk < args.codes:
        parser.error("--chunk must be in (0, --codes)")

    import jax
    import numpy as np

    from vitvq.models.quantizer import l2_normalize, nearest_code

    kz, kc = jax.random.split(jax.random.key(0))
    z = l2_normalize(jax.random.normal(kz, (args.tokens, args.dim)))
    codebook = l2_normalize(jax.random.normal(kc, (args.codes, args.dim)))
    full_matrix = args.tokens * args.codes * 4

    def measure(chunk: int) -> tuple[dict, np.ndarray]:
        fn = jax.jit(lambda a, b: nearest_code(a, b, chunk))
        t = time.perf_counter()
        compiled = fn.lower(z, codebook).compile()
        compile_s = time.perf_counter() - t
        memory = compiled.memory_analysis()
        temp = int(memory.temp_size_in_bytes) if memory is not None else None
        out = compiled(z, codebook).block_until_ready()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            compiled(z, codebook).block_until_ready()
            times.append(time.perf_counter() - t)
        row = {
            "chunk": chunk,
            "ms": round(1e3 * float(np.median(times)), 3),
            "ms_min": round(1e3 * min(times), 3),
            "compile_seconds": round(compile_s, 2),
            "temp_bytes": temp,
            "holds_full_matrix": None if temp is None else temp >= full_matrix,
        }
        return row, np.asarray(out)

    chunked, idx_chunked = measure(args.chunk)
    whole, idx_whole = measure(0)
    result = {
        "benchmark": "code_search",
        "tokens": args.tokens,
        "codes": args.codes,
        "dim": args.dim,
        "device_kind": str(jax.devices()[0].device_kind),
        "full_matrix_bytes": full_matrix,
        "chunked": chunked,
        "unchunked": whole,
        "same_indices": bool(np.array_equal(idx_chunked, idx_whole)),
        "speedup_chunked_vs_unchunked": round(whole["ms"] / chunked["ms"], 3),
        "chunked_ms": chunked["ms"],
        "unchunked_ms": whole["ms"],
        "chunked_temp_bytes": chunked["temp_bytes"],
        "unchunked_temp_bytes": whole["temp_bytes"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
