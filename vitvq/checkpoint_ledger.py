"""Which checkpoint steps are intact: each committed step's digest record, checked before
it is restored, and a damaged step set aside.

Damage after the commit (a truncated or bit-flipped file after a storage incident, a partial
copy between buckets) is caught by a record of every file's size and sha256 that process 0
writes into the step directory once the step is committed (`vitvq.digests`; written within a
step of the commit, checked on every restore). A damaged step, or one that orbax committed
but whose record was never written, is moved aside to `<checkpoints>/../damaged_checkpoints/
<step>` (nothing is deleted) and the run resumes from the newest intact one, saying so in one
line. When no intact checkpoint is left it raises `DataError` rather than start from
scratch, unless `restart_from_scratch=True`. A directory in which no step has a record
(written before records existed) is restored as before, with a warning that it is unverified.

`vitvq.checkpoint.Checkpointer` keeps one `StepLedger` on its orbax manager.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vitvq import digests, paths
from vitvq.errors import DataError

logger = logging.getLogger(__name__)


class StepLedger:
    """The digest records of the steps in `directory`, which `manager` lists and reloads."""

    def __init__(self, directory: str, manager: ocp.CheckpointManager):
        self.directory = directory
        self._manager = manager

    def step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def record(self, step: int) -> None:
        """Writes the digest record of `step` if it is committed (process 0 only)."""
        if jax.process_index() == 0 and step in self._manager.all_steps():
            digests.write(self.step_dir(step))

    def _any_recorded(self, steps: list[int]) -> bool:
        return any(digests.has_record(self.step_dir(s)) for s in steps)

    def damage(self, step: int) -> str | None:
        """What is wrong with checkpoint `step`, or None when it is intact (or unrecorded in
        a directory where no step has a record)."""
        if not self._any_recorded(sorted(self._manager.all_steps())):
            return None
        return digests.check(self.step_dir(step))

    def newest_intact(self, steps: list[int], *, restart_from_scratch: bool) -> int | None:
        """The newest intact one of `steps` (oldest first, not empty), the damaged ones after
        it set aside; None when none is intact and `restart_from_scratch` (else DataError,
        nothing moved). Without any record, the newest step, unverified."""
        if not self._any_recorded(steps):
            logger.warning(
                "The checkpoints in %s have no digest records (written by an older vitvq): "
                "restoring step %d unverified.",
                self.directory,
                steps[-1],
            )
            return steps[-1]
        damaged, intact = {}, None
        for step in reversed(steps):
            problem = digests.check(self.step_dir(step))
            if problem is None:
                intact = step
                break
            damaged[step] = problem
        described = "; ".join(f"step {s}: {why}" for s, why in damaged.items())
        if intact is None and not restart_from_scratch:
            raise DataError(
                f"every checkpoint in {self.directory} is damaged ({described}). Nothing was "
                "changed; to start this run again from step 0, moving them aside, pass "
                "--config.restart_from_scratch=True"
            )
        if damaged:
            aside = self._set_aside(sorted(damaged))
            for step, why in damaged.items():
                logger.warning(
                    "Checkpoint step %d in %s is damaged: %s.", step, self.directory, why
                )
            logger.warning(
                "Moved the damaged checkpoints %s to %s; %s.",
                sorted(damaged),
                aside,
                f"resuming from step {intact}, the newest intact checkpoint"
                if intact is not None
                else "starting from scratch (restart_from_scratch=True)",
            )
        return intact

    def check_intact(self, step: int) -> None:
        """DataError when checkpoint `step` is damaged, naming the intact steps to choose
        from (for reading one step on request: export, `init_from`)."""
        problem = self.damage(step)
        if problem is None:
            return
        intact = [s for s in sorted(self._manager.all_steps()) if self.damage(s) is None]
        offer = f"choose an intact one: steps {intact}" if intact else "none is intact"
        raise DataError(
            f"checkpoint step {step} in {self.directory} is damaged: {problem}; {offer} "
            "(export: --step=N)"
        )

    def _set_aside(self, steps: list[int]) -> str:
        """Moves the step directories to `damaged_checkpoints/` beside the checkpoints
        directory (process 0, the others wait); returns where they went."""
        aside = paths.join(os.path.dirname(self.directory.rstrip("/")), "damaged_checkpoints")
        if jax.process_index() == 0:
            paths.makedirs(aside)
            for step in steps:
                target = paths.as_path(paths.join(aside, str(step)))
                if target.exists():  # set aside before: keep both
                    target = paths.as_path(
                        paths.join(aside, f"{step}.{len(list(target.parent.iterdir()))}")
                    )
                paths.as_path(self.step_dir(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vitvq_damaged_checkpoints_set_aside")
        self._manager.reload()
        return aside
