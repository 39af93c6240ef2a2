"""A record of what a committed checkpoint holds, to tell an intact one from a damaged one.

After orbax commits checkpoint step N, process 0 writes `N/vitvq_digests.json`: the size and
sha256 of every file in the step directory. `check(step_dir)` reads every file again and says
what differs: a file missing, shorter or longer than written (a truncated copy), or with other
bytes (a flipped bit, a partial overwrite). Files added later are ignored.

    write(step_dir)            # once, after the commit
    problem = check(step_dir)  # None (intact), or one readable sentence

The step directory may be local or a URL (gs://...), read through `vitvq.paths`.
"""

from __future__ import annotations

import hashlib
import json
import os

from vitvq import paths

FILE = "vitvq_digests.json"
VERSION = 1
_CHUNK = 1 << 22


def _files(root) -> list:
    """Every file under `root` (an epath.Path), recursively, except the record itself."""
    out, stack = [], [root]
    while stack:
        for child in sorted(stack.pop().iterdir()):
            if child.is_dir():
                stack.append(child)
            elif child.name != FILE or child.parent != root:
                out.append(child)
    return out


def _sha256(path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write(step_dir: str | os.PathLike) -> None:
    """Records every file's size and sha256 in `step_dir/vitvq_digests.json` (atomically)."""
    root = paths.as_path(step_dir)
    files = {}
    for path in _files(root):
        size, sha = _sha256(path)
        files[str(path.relative_to(root))] = {"size": size, "sha256": sha}
    record = {"version": VERSION, "files": files}
    paths.write_text(paths.join(str(step_dir), FILE), json.dumps(record, indent=1, sort_keys=True))


def has_record(step_dir: str | os.PathLike) -> bool:
    return paths.exists(paths.join(str(step_dir), FILE))


def check(step_dir: str | os.PathLike) -> str | None:
    """None when every recorded file is there with its recorded size and sha256; else what
    is wrong, as one sentence naming the first few files."""
    root = paths.as_path(step_dir)
    try:
        record = json.loads((root / FILE).read_text())
        files = record["files"]
    except FileNotFoundError:
        return (
            f"it has no {FILE} (the run stopped between the commit and the record, or an "
            "older vitvq wrote it)"
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {FILE} is unreadable ({err})"
    problems = []
    for name, want in sorted(files.items()):
        path = root / name
        if not path.exists():
            problems.append(f"{name} is missing")
            continue
        size, sha = _sha256(path)
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, {want['size']} were written (truncated?)")
        elif sha != want["sha256"]:
            problems.append(f"{name} has other bytes than were written (sha256 mismatch)")
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more
