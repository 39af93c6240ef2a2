"""What `python -m vitvq.aot` found: the report of one compiled (or refused) train step, as
text for people and as JSON for scripts."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from vitvq import cli

_OOM = re.compile(r"\(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # the compiler's "G" is GiB


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The TPU compiler's refusal of a step that needs more than a chip's HBM."""

    message: str  # the compiler's, one line
    required_bytes: int  # per chip, arguments + temporaries as the compiler counts (0: unsaid)
    available_bytes: int  # what the compiler may use of the HBM (0: unsaid)
    compile_s: float


@dataclasses.dataclass(frozen=True)
class Report:
    """One config's train step compiled for one TPU topology, and where its bytes per chip go."""

    config: str
    topology: str
    device_kind: str
    num_devices: int
    num_hosts: int
    hbm_bytes: int
    margin: float
    mesh: dict[str, int]
    batch_size: int  # global
    phase: str  # the step compiled
    step: Any  # memory.StepMemory of the compiled step, or None when the compiler ran out of HBM
    oom: OutOfMemory | None  # then, what it said
    consumers: tuple[tuple[str, int], ...]  # (what, bytes per chip), largest first
    tensors: tuple[Any, ...]  # memory.Tensor: the largest state tensors, largest first

    @property
    def total_bytes(self) -> int:
        """Per chip: the step's peak bytes (memory.StepMemory.peak_bytes) plus its code, or
        what the compiler said the step needs."""
        if self.step is None:
            return self.oom.required_bytes
        return self.step.peak_bytes + self.step.generated_code_bytes

    @property
    def fits(self) -> bool:
        return self.step is not None and self.total_bytes <= self.margin * self.hbm_bytes

    def to_json(self) -> dict[str, Any]:
        """The report as JSON values: the step's fields (flops per chip) at the top level."""
        skip = ("step", "oom", "consumers", "tensors", "compiled")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.step is not None:
            out.update({f.name: getattr(self.step, f.name) for f in dataclasses.fields(self.step)})
        out = {k: v for k, v in out.items() if k not in skip}
        return {
            **out,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "consumers": dict(self.consumers),
            "out_of_memory": dataclasses.asdict(self.oom) if self.oom else None,
        }


def out_of_memory(error: Exception, compile_s: float) -> OutOfMemory | None:
    """The compiler's out-of-HBM error as an OutOfMemory; None for any other error."""
    text = cli.one_line(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    match = _OOM.search(text)
    if not match:
        return OutOfMemory(text, 0, 0, compile_s)
    required = int(float(match[1]) * _UNITS[match[2]])
    return OutOfMemory(text, required, int(float(match[3]) * _UNITS[match[4]]), compile_s)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_report(r: Report) -> str:
    s, hbm = r.step, _size(r.hbm_bytes)
    lines = [
        f"{r.config} on {r.topology}: {r.num_devices} x {r.device_kind} ({r.num_hosts} hosts),"
        f" {hbm} HBM each",
        f"mesh {' '.join(f'{k}={v}' for k, v in r.mesh.items())}; global batch {r.batch_size};"
        f" {r.phase}",
    ]
    if s is None:
        lines += [
            f"the TPU compiler ran out of HBM after {r.oom.compile_s:.0f} s: {r.oom.message}",
            f"per chip: needs {_size(r.total_bytes)}; the compiler may use "
            f"{_size(r.oom.available_bytes)} of {hbm}",
        ]
    else:
        lines += [
            f"compiled in {s.compile_s:.0f} s; per chip:",
            f"  arguments       {_size(s.argument_bytes):>12}",
            f"  outputs         {_size(s.output_bytes):>12}  ({_size(s.alias_bytes)} of them in "
            "place of the donated state)",
            f"  temporaries     {_size(s.temp_bytes):>12}",
            f"  generated code  {_size(s.generated_code_bytes):>12}",
            f"  total           {_size(r.total_bytes):>12}  = {r.total_bytes / r.hbm_bytes:.0%} "
            f"of {hbm}",
            f"FLOPs per chip per step: {s.flops:.3e}",
        ]
    lines.append("largest state tensors per chip (Adam moments are sharded like their params):")
    for t in r.tensors:
        count = f" (x{t.count})" if t.count > 1 else ""
        lines.append(
            f"  {t.path}{count}: {t.dtype}{list(t.shape)} {t.spec} -> {list(t.shard_shape)}, "
            f"{_size(t.shard_bytes)}"
        )
    verdict = "fits" if r.fits else "DOES NOT FIT"
    lines.append(
        f"{verdict}: {_size(r.total_bytes)} per chip, limit {_size(r.margin * r.hbm_bytes)} "
        f"({r.margin:.0%} of {hbm})"
    )
    if not r.fits:
        lines.append("largest consumers per chip:")
        lines += [f"  {what:<52} {_size(n):>12}" for what, n in r.consumers[:5]]
        ways = [
            "shard the state (--config.mesh.fsdp=N, --config.mesh.tensor=N)",
            "spread the batch over more chips or lower --config.batch_size",
            "use chips with more HBM",
        ]
        parts = dict(r.consumers)
        temporaries = sum(n for what, n in parts.items() if what.startswith("temporaries"))
        state = sum(n for what, n in parts.items() if what.startswith("state."))
        if temporaries > state:
            # More than the state's gradients and updates: activations kept for the backward
            # pass, which recomputing each block frees.
            ways.insert(0, "recompute each block in the backward pass (--config.model.remat=True)")
        lines.append("to fit: " + "; ".join(ways))
    return "\n".join(lines)
