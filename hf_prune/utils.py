"""Writes that a reader sees whole or not at all, shared by every module that writes a file or a folder (exports,
ONNX files, run state, caches, checkpoints, benchmark results), and the number formatters of reports and cards."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "TMP_MARK",
    "OLD_MARK",
    "write_json_atomic",
    "update_json_atomic",
    "temporary_path",
    "recover_interrupted",
    "temporary_folder",
    "swap_into_place",
    "format_int",
    "format_float",
]

# Marks in the names of temporary files and folders: `.<target name><mark><pid>-<random>`. A process that dies leaves
# them behind; `recover_interrupted` removes them (or restores a folder moved aside) once that process is gone.
TMP_MARK = ".hf-prune-tmp-"
OLD_MARK = ".hf-prune-old-"


def temporary_path(target: str | Path, suffix: str = "") -> Path:
    """A path beside `target` for writing it before a rename: marked with this process's id so that a later
    `recover_interrupted(target)` removes it if the process dies; `suffix` is kept last (writers that read the format
    from the file name, such as ONNX's, need it)."""
    target = Path(target)
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-part{suffix}")


def write_json_atomic(path: str | Path, obj, sort_keys: bool = False) -> None:
    """Writes `obj` as JSON to a temporary file beside `path`, flushed to disk, then renames it over `path`: a reader
    sees the old file or the new one, never a part.

    Args:
        path: the file to write (its folder is created).
        obj: anything `json.dumps` takes; it is serialised before any file is touched.
        sort_keys: sort the keys of every mapping (stable diffs of a file rewritten often, e.g. `state.json`).
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def update_json_atomic(path: str | Path, update: Callable[[dict], object], default: dict | None = None) -> dict:
    """Reads the JSON object in `path`, changes it with `update` and writes it back with [`write_json_atomic`].

    The file is read right before it is written, so what another process wrote to it since this one last read it (a
    benchmark's rows, say) is kept. This is no lock: two updates at the same moment can still lose one.

    Args:
        path: the JSON file; missing, it starts as a copy of `default` (or `{}`).
        update: called with the object read; changes it in place (its return value is ignored).
        default: the object of a missing file.

    Returns:
        The object written.
    """
    path = Path(path)
    if path.is_file():
        obj = json.loads(path.read_text(encoding="utf-8"))
    else:
        obj = json.loads(json.dumps(default or {}))  # a deep copy: `update` may change it
    update(obj)
    write_json_atomic(path, obj)
    return obj


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: str | Path) -> None:
    """Cleans up after writes to `target` (a folder or a file) whose process died midway (killed, power loss).

    A temporary file or folder is deleted. A previous folder moved aside just before the swap is moved back when the
    target is missing (the process died between the two renames), and deleted otherwise.
    """
    target = Path(target)
    for mark in (TMP_MARK, OLD_MARK):
        for path in sorted(target.parent.glob(f".{glob.escape(target.name)}{mark}*")):
            match = re.fullmatch(rf"\.{re.escape(target.name)}{re.escape(mark)}(\d+)-.*", path.name)
            if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
                continue
            if mark == OLD_MARK and not target.exists():
                logger.warning("Restoring %s from %s, moved aside by an interrupted write.", target, path)
                os.replace(path, target)
            else:
                logger.info("Removing %s, left behind by an interrupted write.", path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def temporary_folder(target: str | Path) -> Path:
    """A new empty folder beside `target` to build it in, named for `recover_interrupted`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent))


def swap_into_place(tmp: str | Path, target: str | Path) -> None:
    """Renames the complete folder `tmp` to `target`; an existing `target` is moved aside first and removed only once
    the new one is in place (restored if the rename fails)."""
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}{os.getpid()}-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def format_int(n) -> str:
    """`12,345`, or `-` for a missing number."""
    return "-" if n is None else f"{int(n):,}"


def format_float(x, digits: int = 2, suffix: str = "", grouped: bool = False) -> str:
    """`x` with `digits` decimals and `suffix` (`1234.50x`, or `1,234.50x` when `grouped`), or `-` for a missing
    number."""
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{suffix}" if grouped else f"{x:.{digits}f}{suffix}"
