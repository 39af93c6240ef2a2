"""What a restart of a training run must resume from, read off its workdir by the rule
`vitvq.checkpoint.Checkpointer.restore_latest` documents, for the fault tests."""

import pathlib

from vitvq import digests


def resume_point(workdir) -> int | None:
    """The newest checkpoint step with a digest record (a save ends with its record, so a
    step committed by orbax but killed before its record is not resumed from); where no step
    has one (the first save was cut off between its commit and its record), the newest
    committed step; None where nothing is committed."""
    ckpts = pathlib.Path(workdir) / "checkpoints"
    steps = [p for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    recorded = [int(p.name) for p in steps if digests.has_record(p)]
    if recorded:
        return max(recorded)
    return max((int(p.name) for p in steps), default=None)
