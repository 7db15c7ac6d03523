"""Reading and writing files safely: JSON lines, crash-safe writes, one writer per output.

Crash safety is one rule applied everywhere: a file or directory is written under a
temporary name next to its final place and renamed only when complete. A rename within
one filesystem is atomic, so a run killed at any moment leaves either nothing or a
finished output, never something that looks finished.

Shared by every package (data_prep, pipeline, bench); imports only data_prep.errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError


class JSONLineError(Exception):
    """A line of a JSON-lines file that is not valid JSON (yielded, not raised, on request)."""


def read_jsonl(path: str | os.PathLike, bad_lines: str = "raise") -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line of a JSON-lines file, in order.

    The one JSONL reader of the project. A line that is not valid UTF-8 JSON is a UserError naming
    `path:line`; with bad_lines="yield" it comes back as a JSONLineError instead, for callers
    that can skip bad records.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                err = JSONLineError(f"invalid JSON ({e})")
                if bad_lines != "yield":
                    raise UserError(f"{path}:{lineno}: {err}") from None
                yield lineno, err


def _tmp_name(path: Path) -> Path:
    # The pid keeps two concurrent writers (or a rerun after a kill) from sharing a temp name;
    # the ".tmp-" prefix marks leftovers that a rerun may delete.
    return path.with_name(f".tmp-{path.name}.{os.getpid()}")


def refuse_repeated_inputs(files: list[tuple[str, Path]]) -> None:
    """[(argument as given, file it expands to)]: a file reached twice (the same argument twice, or a
    directory and a file inside it) would be packed twice, so its documents would weigh double."""
    seen: dict[Path, str] = {}
    for arg, f in files:
        key = f.resolve()
        if key in seen:
            both = f"`{seen[key]}` and `{arg}`" if seen[key] != arg else f"`{arg}` twice"
            raise UserError(f"input {f}: given twice ({both}); each document would be packed twice")
        seen[key] = arg


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file that becomes `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, flag: str = "output directory") -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `path` only if the block completes.

    `path` must not exist or be empty unless `force`, in which case it is replaced whole at
    the end (the old contents survive a failure). The writer owns `path` while it writes
    (`owned`): a second writer of the same folder is refused, naming this one's pid, instead of
    both finishing and one output silently replacing the other.
    """
    path = Path(path)

    def refuse_non_empty():
        if path.exists() and any(path.iterdir()) and not force:
            raise UserError(f"{flag} {path} is not empty (pass --force to replace it)")

    refuse_non_empty()
    with owned(path, flag):
        refuse_non_empty()  # again, now that it is ours: a writer may have finished in between
        _remove_dead_leftovers(path)
        tmp = _tmp_name(path)  # .tmp-NAME.PID: the pid tells a later run whether its writer is gone
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            if path.exists():
                old = path.with_name(f".old-{path.name}.{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _existing_ancestor(path: Path) -> Path:
    """`path` itself if something is there, else the nearest ancestor that exists."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def check_writable(path: str | os.PathLike, flag: str, *, inside: bool = False) -> None:
    """Refuse, before any work, an output this process could not write: one line naming `flag`
    and the path, instead of a traceback at the end of an hour's work.

    Outputs are written beside their final name and renamed into place, so the folder that must
    be writable is `path`'s parent; with `inside`, `path` is a folder written into (a run
    directory), itself. The nearest part of that folder that exists must be a folder, and a file
    must really be creatable in it: trying it is the only test that holds for root, ACLs and
    read-only mounts, where permission bits say nothing.
    """
    path = Path(path)
    folder = path if inside else path.parent
    where = _existing_ancestor(folder)
    if not where.is_dir():
        what = "a file" if where.is_file() else "something else"
        raise UserError(f"{flag} {path}: cannot be written: {where} is {what}, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-check.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot be written: no file can be created in {where} "
            f"({e.strerror}); choose a writable location"
        ) from None


def _lock_path(path: Path) -> Path:
    # Beside the output, not in it: the output is renamed into place whole, and a folder that
    # does not exist yet can still be owned. The ".tmp-" prefix marks it as a leftover that a
    # later writer takes over (it is removed when its owner ends; a killed owner leaves it behind,
    # unlocked, because the kernel drops an flock with its process).
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / f".tmp-{path.name}.lock"


@contextlib.contextmanager
def owned(path: str | os.PathLike, flag: str, wait_s: float = 0.0) -> Iterator[None]:
    """Own an output (a model folder, a results file, a shard prefix) while writing it, as training
    owns its run directory: a second writer of the same output is refused (UserError naming the
    output and the holder's pid), or with `wait_s` waits that long for the holder to end first.

    The lock is an flock on `.tmp-NAME.lock` beside the output, created with any missing parent
    folders; on exit the lock file is removed, and so is every folder it created that is still
    empty (a refused or failed writer leaves nothing).
    """
    path = Path(path)
    lock = _lock_path(path)
    created = [d for d in [lock.parent, *lock.parent.parents] if not os.path.lexists(d)]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create {lock.parent} ({e.strerror})") from None
    deadline = time.monotonic() + wait_s
    fd = None
    try:
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                fd = None
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"{flag} {path}: another process is writing it ({holder}); wait for it to "
                        f"end, or choose another {flag}"
                    ) from None
                time.sleep(0.1)
                continue
            # The previous owner removes the file as it ends: if ours is no longer the one at that
            # name, another writer may lock the new one; start again on it.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{_command()}\n".encode(),
        )
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still held, so nobody can own the old file after us
            os.close(fd)
        for d in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _command() -> str:
    """What holds a lock, for the message of the process it refuses: `python -m pipeline.export`."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a temp file's writer may still be running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_leftovers(path: Path) -> None:
    """Delete `.tmp-NAME.PID` directories left by a killed writer of `path` (only dead pids: a
    concurrent writer's work in progress is left alone)."""
    for p in path.parent.glob(f".tmp-{path.name}.*"):
        pid = p.name.rsplit(".", 1)[-1]
        if p.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
