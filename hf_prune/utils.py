"""Writes that a reader sees whole or not at all, shared by every module that writes a file or a folder (exports,
ONNX files, run state, caches, checkpoints, benchmark results), and the number formatters of reports and cards.

- `write_json_atomic`: one file, written to a uniquely named temporary file beside it and renamed over it.
- `update_json_atomic`: read-modify-write of one JSON file under an exclusive lock (`file_lock`), so concurrent
  updates from several processes all land.
- `write_files_together`: several files of one folder (an export's report and model card) that change together; a
  process killed midway is completed by `recover_files_together` on the next call.
- `swap_into_place`: a complete folder replaces another in one atomic exchange where the system has one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from transformers.utils import logging

try:  # POSIX only; without it `file_lock` locks nothing (see there)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.get_logger(__name__)

__all__ = [
    "TMP_MARK",
    "OLD_MARK",
    "LOCK_MARK",
    "COMMIT_MARK",
    "write_json_atomic",
    "update_json_atomic",
    "file_lock",
    "write_files_together",
    "recover_files_together",
    "temporary_path",
    "recover_interrupted",
    "temporary_folder",
    "exchange_paths",
    "swap_into_place",
    "format_int",
    "format_float",
]

# Marks in the names of temporary files and folders: `.<target name><mark><pid>-<random>`. A process that dies leaves
# them behind; `recover_interrupted` removes them (or restores a folder moved aside) once that process is gone.
TMP_MARK = ".hf-prune-tmp-"
OLD_MARK = ".hf-prune-old-"
# `.<target name><LOCK_MARK>`: the lock file of `file_lock`, removed by the process that held the lock.
LOCK_MARK = ".hf-prune-lock"
# `.hf-prune-commit-<pid>-<random>.json`: the list of renames of an unfinished `write_files_together`.
COMMIT_MARK = ".hf-prune-commit-"


def temporary_path(target: str | Path, suffix: str = "") -> Path:
    """A new, unique path beside `target` for writing it before a rename (nothing is created).

    The name holds this process's id, so that a later `recover_interrupted(target)` removes the file if the process
    dies, and a random part, so that two writers of one target (two threads, two calls) never share a temporary file;
    `suffix` is kept last (writers that read the format from the file name, such as ONNX's, need it).
    """
    target = Path(target)
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}{suffix}")


def _fsync_folder(folder: Path) -> None:
    """Makes the renames inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(target: Path, data: str | bytes) -> Path:
    """`data` written and flushed to disk in a new temporary file beside `target`; returns that file."""
    tmp = temporary_path(target)
    mode, kwargs = ("xb", {}) if isinstance(data, bytes) else ("x", {"encoding": "utf-8", "newline": ""})
    try:
        with open(tmp, mode, **kwargs) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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
    tmp = _write_temporary(path, text)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{LOCK_MARK}")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Holds an exclusive lock on `path` for the `with` block, across processes of this machine.

    The lock is `fcntl.flock` on a sidecar file `.<name>.hf-prune-lock` beside `path` (Linux and other POSIX systems,
    local filesystems; an advisory lock: it excludes only the writers that take it too). The lock file is removed
    by its holder before the lock is released; a waiter that then holds a removed file tries again, so two
    processes never both believe they hold the lock. A holder that is killed leaves the file behind, unlocked (the
    kernel releases the lock): the next holder takes it and removes it. Where `fcntl` does not exist (Windows)
    nothing is locked. Locks do not nest: the same process taking the lock of one path twice waits for itself.

    Args:
        path: the file to guard (it need not exist; its folder is created).
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)  # the holder before us removed this file: lock the one at the path now
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def update_json_atomic(path: str | Path, update: Callable[[dict], object], default: dict | None = None) -> dict:
    """Reads the JSON object in `path`, changes it with `update` and writes it back with [`write_json_atomic`], all
    under [`file_lock`]`(path)`.

    Concurrent updates of one file from several processes (benchmark rows written by two runs) are serialised, so
    none is lost; a reader that does not lock still sees the old file or the new one, never a part.

    Args:
        path: the JSON file; missing, it starts as a copy of `default` (or `{}`).
        update: called with the object read; changes it in place (its return value is ignored).
        default: the object of a missing file.

    Returns:
        The object written.
    """
    path = Path(path)
    with file_lock(path):
        if path.is_file():
            obj = json.loads(path.read_text(encoding="utf-8"))
        else:
            obj = json.loads(json.dumps(default or {}))  # a deep copy: `update` may change it
        update(obj)
        write_json_atomic(path, obj)
    return obj


def write_files_together(files: Mapping[str | Path, str | bytes]) -> None:
    """Writes several files of one folder so that a process killed midway leaves them to be completed, not mixed.

    Every file is first written whole to a temporary name beside its target and flushed; then a commit list naming
    the renames is written (atomically) and the renames are made in the order given, and the list is removed. A
    reader sees at most the files renamed so far in the middle of this call (put first the file that must never be
    older than the others: the model card before the report it shows); a process killed after the list was written
    is completed by [`recover_files_together`] on the next call, one killed before it leaves only temporary files,
    which `recover_interrupted` removes (call `recover_files_together` first: it needs them). Concurrent writers of
    the same files should hold a [`file_lock`].

    Args:
        files: `{path: content}`, every path in one folder; text is written as UTF-8.
    """
    targets = [Path(p) for p in files]
    folders = {t.parent.absolute() for t in targets}
    if len(folders) != 1:
        raise ValueError(f"write_files_together writes files of one folder, got {sorted(map(str, folders))}.")
    folder = targets[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []
    try:
        for target, data in zip(targets, files.values()):
            written.append((_write_temporary(target, data), target))
        commit = folder / f"{COMMIT_MARK}{os.getpid()}-{secrets.token_hex(8)}.json"
        write_json_atomic(commit, {"renames": [[tmp.name, target.name] for tmp, target in written]})
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in written:
        os.replace(tmp, target)
    commit.unlink()
    _fsync_folder(folder)


def recover_files_together(folder: str | Path) -> list[str]:
    """Completes the [`write_files_together`] calls in `folder` whose process died after its commit list was
    written: the renames not made yet are made. Returns the names of the files completed."""
    folder = Path(folder)
    done = []
    for commit in sorted(folder.glob(f"{glob.escape(COMMIT_MARK)}*.json")):
        match = re.fullmatch(rf"{re.escape(COMMIT_MARK)}(\d+)-.*\.json", commit.name)
        if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        try:
            renames = json.loads(commit.read_text(encoding="utf-8"))["renames"]
        except (OSError, ValueError, KeyError, TypeError):
            renames = []  # written atomically, so this is not a commit list of ours: leave the files alone
        for tmp_name, target_name in renames:
            tmp = folder / tmp_name
            if tmp.is_file():
                logger.warning("Completing %s, left unfinished by an interrupted write.", folder / target_name)
                os.replace(tmp, folder / target_name)
                done.append(target_name)
        commit.unlink(missing_ok=True)
    return done


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


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28 and later
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):
        _renameat2 = None


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Exchanges two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`): a reader of either
    path sees the one or the other, never nothing. Returns False, changing nothing, where the system or the
    filesystem has no such exchange; other failures raise `OSError`."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_into_place(tmp: str | Path, target: str | Path, exchange: bool = True) -> None:
    """Renames the complete folder `tmp` to `target`.

    An existing `target` is exchanged with `tmp` in one atomic step where the system can (`exchange_paths`; a reader
    of `target` never finds it missing) and the old folder removed; otherwise, or with `exchange=False`, it is moved
    aside first and removed only once the new one is in place (restored if the rename fails, and by
    `recover_interrupted` if the process dies between the two renames).
    """
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)
        return
    if exchange and target.is_dir() and exchange_paths(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # `tmp` holds the old folder now; named for recover_interrupted
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
