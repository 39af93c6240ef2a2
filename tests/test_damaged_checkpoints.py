"""A committed checkpoint damaged afterwards (truncated, bit-flipped or deleted array files,
an unrecorded step) is never loaded: the restart names it and what is wrong, sets it aside and
resumes from the newest intact one; with none intact it stops, unless asked to start again.
The CLI side (a training run and export) is in tests/test_faults.py."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitvq import digests
from vitvq.checkpoint import Checkpointer
from vitvq.errors import DataError


def _state(value: float):
    return {
        "params": {"w": jnp.full((64, 32), value), "b": jnp.arange(32.0) * value},
        "step": jnp.int32(value),
    }


def _abstract():
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0.0)
    )


def _saved(tmp_path, steps=(1, 2, 3)) -> pathlib.Path:
    directory = tmp_path / "run" / "checkpoints"
    with Checkpointer(directory, save_every_steps=1, max_to_keep=None) as ckpt:
        for step in steps:
            assert ckpt.save(step, _state(float(step)))
    return directory


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a step (orbax's OCDBT data), largest first."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"truncate": _truncate, "flip_a_byte": _flip, "delete": lambda p: p.unlink()}


def test_every_committed_step_has_a_record_of_its_files(tmp_path):
    directory = _saved(tmp_path)
    for step in (1, 2, 3):
        record = json.loads((directory / str(step) / digests.FILE).read_text())
        on_disk = {
            str(p.relative_to(directory / str(step)))
            for p in (directory / str(step)).rglob("*")
            if p.is_file() and p.name != digests.FILE
        }
        assert set(record["files"]) == on_disk and len(on_disk) > 3
        assert digests.check(directory / str(step)) is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_is_set_aside_and_the_run_resumes_from_the_previous(
    tmp_path, damage, caplog
):
    directory = _saved(tmp_path)
    victim = _data_files(directory / "3")[0]
    DAMAGE[damage](victim)
    with caplog.at_level(logging.WARNING), Checkpointer(directory, save_every_steps=1) as ckpt:
        state, step = ckpt.restore_latest(_abstract())
        assert step == 2 and ckpt.all_steps() == [1, 2]
        np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 2.0))
        assert ckpt.save(3, _state(3.0))  # the resumed run writes step 3 again
    name = str(victim.relative_to(directory / "3"))
    reason = {"truncate": "truncated", "flip_a_byte": "sha256 mismatch", "delete": "missing"}
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert any(f"step 3 in {directory} is damaged" in m and name in m for m in lines), lines
    assert any(reason[damage] in m for m in lines), lines
    assert any("resuming from step 2, the newest intact checkpoint" in m for m in lines), lines
    # Nothing is deleted: the damaged step is kept beside the checkpoints.
    aside = tmp_path / "run" / "damaged_checkpoints" / "3"
    assert aside.is_dir() and digests.check(aside) is not None
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        state, step = ckpt.restore_latest(_abstract())
    assert step == 3 and float(state["params"]["w"][0, 0]) == 3.0


def test_every_kind_of_damage_at_once_down_to_the_oldest(tmp_path, caplog):
    directory = _saved(tmp_path)
    _truncate(_data_files(directory / "3")[0])
    _flip(_data_files(directory / "2")[0])
    with caplog.at_level(logging.WARNING), Checkpointer(directory, save_every_steps=1) as ckpt:
        _, step = ckpt.restore_latest(_abstract())
    assert step == 1
    assert sorted(p.name for p in (tmp_path / "run" / "damaged_checkpoints").iterdir()) == [
        "2",
        "3",
    ]


def test_no_intact_checkpoint_stops_unless_asked_to_start_again(tmp_path):
    directory = _saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        _data_files(directory / str(step))[0].unlink()
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        with pytest.raises(DataError) as info:
            ckpt.restore_latest(_abstract())
        assert ckpt.all_steps() == [1, 2]  # nothing moved
    message = str(info.value)
    assert "every checkpoint in" in message and "--config.restart_from_scratch=True" in message
    assert "step 2:" in message and "step 1:" in message and "is missing" in message
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        assert ckpt.restore_latest(_abstract(), restart_from_scratch=True) is None
        assert ckpt.all_steps() == []
    assert len(list((tmp_path / "run" / "damaged_checkpoints").iterdir())) == 2


def test_a_step_without_its_record_counts_as_damaged_beside_recorded_ones(tmp_path):
    directory = _saved(tmp_path)
    (directory / "3" / digests.FILE).unlink()  # stopped between the commit and the record
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        _, step = ckpt.restore_latest(_abstract())
    assert step == 2


def test_checkpoints_without_any_record_are_restored_unverified(tmp_path, caplog):
    directory = _saved(tmp_path)
    for step in (1, 2, 3):
        (directory / str(step) / digests.FILE).unlink()
    with caplog.at_level(logging.WARNING), Checkpointer(directory, save_every_steps=1) as ckpt:
        _, step = ckpt.restore_latest(_abstract())
    assert step == 3
    assert any("unverified" in r.getMessage() for r in caplog.records)


def test_reading_a_damaged_step_as_saved_names_the_intact_ones(tmp_path):
    directory = _saved(tmp_path)
    _flip(_data_files(directory / "3")[0])
    with Checkpointer(directory, save_every_steps=1, read_only=True) as ckpt:
        with pytest.raises(DataError) as info:
            ckpt.restore_as_saved()
        tree, step = ckpt.restore_as_saved(2)
    message = str(info.value)
    assert "checkpoint step 3" in message and "sha256 mismatch" in message
    assert "intact one: steps [1, 2]" in message and "--step=N" in message
    assert step == 2 and float(tree["params"]["w"][0, 0]) == 2.0
