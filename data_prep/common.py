"""Pieces every job shares: the user-facing error type and crash-safe file writes.

Crash safety is one rule applied everywhere: a file or directory is written under a
temporary name next to its final place and renamed only when complete. A rename within
one filesystem is atomic, so a run killed at any moment leaves either nothing or a
finished output, never something that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A mistake in the user's input: printed as one clear line, never as a traceback.

    The message must name what is at fault: the file (and line), the config key or the flag.
    """


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


EXIT_USER, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 4, 130


class Diverged(UserError):
    """Training produced a non-finite loss, gradient norm or weight: one line naming the step, exit 4,
    and the last good checkpoint stays the latest. Not exit 2: the input may be fine (an unlucky
    learning rate, bad data deep in a corpus), and a scheduler can tell the two apart."""
    exit_code = EXIT_DIVERGED


def fail_cleanly(main):
    """Decorator for entry points: a UserError becomes one `error: ...` line on stderr and exit 2;
    Ctrl-C becomes one line and exit 130 (128 + SIGINT), not a traceback. Outputs are written
    atomically (below), so an interrupted command leaves nothing half-written, and training
    resumes from its last complete checkpoint."""

    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", EXIT_USER))
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C): nothing half-written is left; rerun the same command to "
                  "continue", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    wrapper.__doc__ = main.__doc__
    wrapper.__name__ = main.__name__
    return wrapper


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
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `path` only if the block completes.

    `path` must not exist or be empty unless `force`, in which case it is replaced whole at
    the end (the old contents survive a failure).
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not force:
        raise UserError(f"output directory {path} is not empty (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
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
