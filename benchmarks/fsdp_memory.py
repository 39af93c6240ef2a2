"""Per-device memory of VIM-Large and ViT-VQGAN SL training under FSDP, on fake devices.

    python benchmarks/fsdp_memory.py                  # both models, fsdp 1,2,4,8 and 4x2 TP
    python benchmarks/fsdp_memory.py --models=vim_large --fsdp=8 --tensor= --step_depths=full

Nothing of model size is allocated: the state is `jax.eval_shape`d, its shardings come from
the config's logical axis rules, and the state creation and the train step are compiled,
never run, on a mesh of 8 fake CPU devices (data = devices / (fsdp * tensor)).

State (params + optimizer state + the rest of the state): its bytes unsharded (one copy),
the bytes per device from the compiled state creation's memory analysis (the model's own
initializers), the same from the shardings (each leaf's shard), their ratio, and the bytes
of leaves no mesh axis splits.

Train step (global batch --batch_per_shard x data x fsdp, the config's compute dtype, as
XLA:CPU compiles it): per-device argument, temporary and peak bytes from its memory analysis.
Compiling the whole step of a 36-block VIM takes ~10 GB of RAM and many minutes on 2 cores,
so by default the step is compiled with 2 and 4 blocks (VIM) or decoder blocks (SL; the
8-block encoder stays) and its figures extrapolated linearly to the configured depth (every
block adds the same bytes; `--step_depths=2,4,12` on VIM-Large was within 1% of the line).
`--step_depths=full` compiles the real depth instead; `--step_depths=` skips the step.

A table, then one JSON object as the last line.
"""

import argparse
import copy
import functools
import importlib.util
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    # name -> (config file, tokenizer config file for stage 2, the config path of the depth
    # that sets the step's size)
    "vim_large": ("configs/vim_large.py", "configs/vitvq_small.py", ("model", "depth")),
    "vitvq_sl": ("configs/vitvq_large.py", None, ("model", "decoder", "depth")),
}
STEP_FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def get_path(config, path):
    for key in path:
        config = config[key]
    return config


def with_depth(config, path, depth: int):
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = depth
    return config


def build_at_depth(memory, config, depth_path, mesh, tokenizer_config, depth):
    """The trainer of `config` with the depth at `depth_path` set to `depth`."""
    return memory.build_trainer(with_depth(config, depth_path, depth), mesh, tokenizer_config)


def step_figures(memory, build, depths, full_depth, batch_per_shard):
    """The step's figures at the configured depth (compiled there, or extrapolated from the
    compiled `depths`) and the compiled points."""
    points = []
    for depth in depths or [full_depth]:
        step = memory.step_memory(build(depth), batch_per_shard)
        point = {f: getattr(step, f) for f in STEP_FIELDS}
        point.update(
            depth=depth, batch_size=step.batch_size, compile_cpu_s=round(step.compile_cpu_s, 1)
        )
        points.append(point)
    if len(points) == 1:
        return dict(points[0]), points
    (d0, p0), (d1, p1) = (points[0]["depth"], points[0]), (points[-1]["depth"], points[-1])
    out = {f: round(p0[f] + (full_depth - d0) * (p1[f] - p0[f]) / (d1 - d0)) for f in STEP_FIELDS}
    out.update(depth=full_depth, batch_size=p0["batch_size"], extrapolated=True)
    return out, points


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vim_large,vitvq_sl")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--fsdp", default="1,2,4,8", help="fsdp sizes (tensor 1)")
    parser.add_argument(
        "--tensor", default="4x2", help="extra FSDPxTENSOR meshes, comma separated ('' = none)"
    )
    parser.add_argument(
        "--step_depths",
        default="2,4",
        help="depths the step is compiled at and extrapolated from; 'full': the real depth; "
        "'': no step",
    )
    parser.add_argument("--batch_per_shard", type=int, default=1)
    parser.add_argument(
        "--init",
        choices=("model", "zeros"),
        default="model",
        help="compile the model's initializers, or zeros of the same state (fast)",
    )
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    args = parser.parse_args()

    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import jax

    from vitvq import memory, parallel

    if jax.device_count() != args.devices:
        sys.exit(f"expected {args.devices} devices, got {jax.device_count()}")
    meshes = [(f, 1) for f in ints(args.fsdp)]
    for item in filter(None, args.tensor.split(",")):
        f, t = (int(x) for x in item.split("x"))
        meshes.append((f, t))
    with_step = args.step_depths != ""
    step_depths = [] if args.step_depths in ("full", "") else ints(args.step_depths)
    if len(step_depths) == 1:
        parser.error("--step_depths needs two depths or more to extrapolate from, or 'full'")

    rows = []
    for name in args.models.split(","):
        config_file, tokenizer_file, depth_path = MODELS[name]
        config = load_config(config_file)
        if args.dtype:
            config.dtype = args.dtype
        tokenizer_config = load_config(tokenizer_file) if tokenizer_file else None
        full_depth = get_path(config, depth_path)
        for fsdp, tensor in meshes:
            data = args.devices // (fsdp * tensor)
            mesh = parallel.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))
            start = time.perf_counter()
            trainer = memory.build_trainer(config, mesh, tokenizer_config, perceptual=False)
            state = memory.state_memory(trainer, init=args.init)
            abstract, _ = trainer.abstract_state()
            row = dict(
                model=name,
                data=data,
                fsdp=fsdp,
                tensor=tensor,
                params=sum(x.size for x in jax.tree_util.tree_leaves(abstract.params)),
                unsharded_bytes=state.unsharded_bytes,
                per_device_bytes=state.per_device_bytes,
                shard_bytes=state.shard_bytes,
                ratio=round(state.ratio, 4),
                parts={k: list(v) for k, v in state.parts.items() if v[0]},
                replicated_bytes=sum(b for _, b in state.replicated),
                largest_replicated=list(state.replicated[0]) if state.replicated else None,
                init=state.init,
                state_compile_s=round(state.compile_s, 1),
                state_compile_cpu_s=round(state.compile_cpu_s, 1),
            )
            if with_step:
                build = functools.partial(
                    build_at_depth, memory, config, depth_path, mesh, tokenizer_config
                )
                step, points = step_figures(
                    memory, build, step_depths, full_depth, args.batch_per_shard
                )
                row["step"], row["step_points"] = step, points
            row["total_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(format_row(row), flush=True)

    print()
    print(table(rows))
    print(json.dumps({"devices": args.devices, "rows": rows}, sort_keys=True))


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def format_row(r: dict) -> str:
    step = r.get("step", {})
    return (
        f"{r['model']} data={r['data']} fsdp={r['fsdp']} tensor={r['tensor']}: "
        f"{mib(r['per_device_bytes'])} of {mib(r['unsharded_bytes'])} MiB per device "
        f"(ratio {r['ratio']}), step temp {mib(step.get('temp_bytes'))} MiB, {r['total_s']} s"
    )


def table(rows: list[dict]) -> str:
    head = (
        "| model | data x fsdp x tensor | params | state unsharded MiB | per device MiB "
        "(compiled) | per device MiB (shards) | ratio | replicated MiB | step batch "
        "| step args MiB | step temp MiB | step peak MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        step = r.get("step", {})
        lines.append(
            f"| {r['model']} | {r['data']} x {r['fsdp']} x {r['tensor']} "
            f"| {r['params'] / 1e6:,.0f}M | {mib(r['unsharded_bytes'])} "
            f"| {mib(r['per_device_bytes'])} | {mib(r['shard_bytes'])} | {r['ratio']:.4f} "
            f"| {mib(r['replicated_bytes'])} | {step.get('batch_size', '-')} "
            f"| {mib(step.get('argument_bytes'))} | {mib(step.get('temp_bytes'))} "
            f"| {mib(step.get('peak_bytes'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
