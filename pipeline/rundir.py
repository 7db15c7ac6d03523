"""The run directory: its layout, which checkpoints are complete, the latest step, record.json,
and who may write it. Training, resume, export, transplant and chat vector all ask this module.

    OUT/
      run.json                  the plan of the run (config, groups, stages, batch, base model, and
                                the chat template its chat data was rendered with: what it ships).
                                Its paths are absolute, and `run_dir` says where it was written: a
                                later command works from any folder, and a run directory moved
                                together with its base model finds it at the same relative place
      metrics.jsonl, loss.png   one line per logged or validated step; the curves, written at the end
      tensorboard/, csv/, wandb/  DeepSpeed's monitors, when `report_to` names them
      .lock                     held by the training that owns the directory (pid, host)
      checkpoints/
        step_00000200/          DeepSpeed's files (layer_NN-model_states.pt, ...) and
          record.json           {"step", "files": {name: sha256}}, written last, by rank 0
        latest                  "step_00000200", for DeepSpeed's own tools; never read here

A checkpoint is complete once its record.json exists; it is written after every rank finished
saving, so a save killed half-way leaves a tag without one. **The latest step is the highest
complete one**: `latest` is written after the record, so a kill between the two leaves it stale,
and a rule that trusted it could make resume and export pick different steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_write_json, atomic_write_text, sha256_file

RUN_FORMAT_VERSION = 1
RECORD = "record.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.loss_png = self.path / "loss.png"
        self.checkpoints = self.path / "checkpoints"
        self.lock_file = self.path / ".lock"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def tag_dir(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    # --------------------------------------------------------------- checkpoints
    def complete_steps(self) -> list[int]:
        """Every step whose checkpoint has its record.json, ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _TAG.match(p.name)) and (p / RECORD).is_file()
        )

    def latest_step(self) -> int | None:
        """The one rule for "the latest checkpoint": the highest complete step."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None, flag: str = "--step") -> int:
        """`step` if it is complete, else the latest; errors list what is available."""
        steps = self.complete_steps()
        if not steps:
            raise UserError(f"{self.checkpoints}: no complete checkpoint (none has a {RECORD})")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(
                f"{flag} {step}: {self.path} has no complete checkpoint at step {step} "
                f"(available: {', '.join(map(str, steps))})"
            )
        return step

    def read_record(self, step: int) -> dict:
        path = self.tag_dir(step) / RECORD
        try:
            record = json.loads(path.read_text())
            if int(record["step"]) != step or not isinstance(record["files"], dict):
                raise ValueError(f"names step {record['step']}")
        except FileNotFoundError:
            raise UserError(f"{self.tag_dir(step)}: checkpoint is incomplete (no {RECORD})") from None
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path}: unreadable checkpoint record ({e})") from None
        return record

    def verify_file(self, step: int, name: str, record: dict | None = None) -> Path:
        """Check one file of a complete checkpoint against its record; return its path."""
        record = record or self.read_record(step)
        record_path = self.tag_dir(step) / RECORD
        path = self.tag_dir(step) / name
        want = record["files"].get(name)
        if want is None:
            raise UserError(f"{record_path}: does not list {name} (checkpoint incomplete?)")
        if not path.is_file():
            raise UserError(f"{path}: missing (listed in {record_path})")
        got = sha256_file(path)
        if got != want:
            raise UserError(
                f"{path}: sha256 {got[:12]}... disagrees with {record_path} ({want[:12]}...): "
                f"the file is corrupt or was changed after the checkpoint was written"
            )
        return path

    def verify(self, step: int) -> dict:
        """Check every file of a complete checkpoint; return its record."""
        record = self.read_record(step)
        for name in record["files"]:
            self.verify_file(step, name, record)
        return record

    def write_record(self, step: int) -> None:
        """Mark a checkpoint complete (rank 0, after every rank has saved): hash its files."""
        tag_dir = self.tag_dir(step)
        files = {p.name: sha256_file(p) for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != RECORD}
        atomic_write_json(tag_dir / RECORD, {"step": step, "files": files})
        atomic_write_text(self.checkpoints / "latest", tag_for(step) + "\n")

    def discard_incomplete(self, step: int) -> None:
        """Remove a tag left by a killed save of the same step, before saving it again."""
        if self.tag_dir(step).exists():
            shutil.rmtree(self.tag_dir(step))

    def prune(self, keep_last: int) -> None:
        if keep_last > 0:
            for old in self.complete_steps()[:-keep_last]:
                shutil.rmtree(self.tag_dir(old), ignore_errors=True)

    # --------------------------------------------------------------- run.json
    def read_run(self) -> dict:
        if not self.run_json.is_file():
            raise UserError(
                f"{self.path}: not a run directory (no run.json; runs are written by `python -m pipeline.train`)"
            )
        try:
            run = json.loads(self.run_json.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.run_json}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(run, dict) or run.get("format_version") != RUN_FORMAT_VERSION:
            raise UserError(
                f"{self.run_json}: format_version {run.get('format_version') if isinstance(run, dict) else None!r} "
                f"is not supported (expected {RUN_FORMAT_VERSION})"
            )
        return run

    def check_resume(self, record: dict, may_change: set[str]) -> None:
        """When run.json exists (a resume), refuse a record whose config differs in a key that
        changes what the run computes (anything outside `may_change`), naming the keys.

        Paths compare by where they lead, not by how they are spelled: the records hold them
        absolute (config.resolve_paths; a run.json from before that is read as relative to the
        working directory, as it was written). `out` is this directory, wherever it now is; and a
        run directory moved or copied together with its base model and data (a project folder
        moved whole) resumes when each path is the same relative to the run directory."""
        if not self.run_json.exists():
            return
        from .config import relative_paths, resolve_paths

        old = self.read_run()
        # Other pipeline stages: each stage's checkpoint files hold the layers, and the optimizer
        # state, of its own stages' bounds; nothing maps them onto other bounds. Refused here,
        # before anything in the directory changes (and before the config comparison below, which
        # would only name `pipeline_stages`). Another data-parallel size is fine: the resume
        # re-partitions each stage's optimizer state (training/checkpoint.py).
        if self.latest_step() is not None and old.get("stages") != record.get("stages"):
            o_st, n_st = old.get("stages") or [], record.get("stages") or []
            raise UserError(
                f"{self.run_json}: this run's checkpoints were written with {len(o_st)} pipeline stage(s) "
                f"(layers {o_st}); this job has {len(n_st)} ({n_st}). A resume keeps the stages, and "
                f"only the data-parallel size may change: resume with `pipeline_stages: {len(o_st)}` "
                f"(on any multiple of {len(o_st)} rank(s)), or export the latest checkpoint "
                f"(python -m pipeline.export) and start a new run from it (the optimizer state starts afresh)"
            )
        o, n = resolve_paths(old.get("config", {})), record["config"]
        changed = sorted(k for k in set(o) | set(n) if o.get(k) != n.get(k) and k not in may_change | {"out"})
        if changed and old.get("run_dir") and record.get("run_dir"):
            ro, rn = relative_paths(o, old["run_dir"]), relative_paths(n, record["run_dir"])
            changed = [k for k in changed if ro.get(k) != rn.get(k)]
        if changed:
            detail = ", ".join(f"`{k}` {o.get(k)!r} -> {n.get(k)!r}" for k in changed)
            raise UserError(
                f"{self.run_json}: this run directory was started with a different config "
                f"({detail}); use a new `out`, or restore them to resume"
            )
        if (old.get("base_model") or {}).get("fingerprint") != (record.get("base_model") or {}).get("fingerprint"):
            raise UserError(
                f"{self.run_json}: the base model {record['base_model']['path']} has changed since "
                f"this run started (base_model.fingerprint); use a new `out`"
            )
        # The same manifest path repacked with another template: the checkpoints learned the old
        # format, the rest of the run would learn the new one, and the model could ship only one.
        sha = lambda r: (r.get("chat_template") or {}).get("sha256")  # noqa: E731
        if "chat_template" in old and sha(old) != sha(record):
            raise UserError(
                f"{self.run_json}: the chat data's template has changed since this run started "
                f"(chat_template.sha256 {str(sha(old))[:12]} -> {str(sha(record))[:12]}); use a new "
                f"`out`, or restore the data it started with"
            )

    def write_run(self, record: dict, may_change: set[str]) -> None:
        """Write run.json, after `check_resume`."""
        self.check_resume(record, may_change)
        atomic_write_json(self.run_json, {"format_version": RUN_FORMAT_VERSION, **record})

    # --------------------------------------------------------------- ownership
    def _in_use(self, holder: str) -> UserError:
        return UserError(
            f"`out` {self.path}: in use by another training ({holder}); wait for it to end, "
            f"or give this run its own `out`"
        )

    def check_free(self) -> None:
        """At preflight, before DeepSpeed starts: refuse at once a directory another training holds
        (`lock` takes it for real later, on rank 0; this only looks, and creates nothing)."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR)
        except OSError:  # no lock file yet (or none we may open): nothing to look at
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(os.read(fd, 4096).decode(errors="replace").strip() or "another process") from None
        finally:
            os.close(fd)  # closing drops the lock if we got it

    @contextlib.contextmanager
    def lock(self):
        """Own the directory for a training: a second writer meets a clear error.

        An flock is released by the kernel when its process dies, so a killed training never
        leaves the directory locked (no stale-pid guessing). On network filesystems flock is only
        as good as the filesystem's lock support; there, keep one `out` per job.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"`out` {self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise self._in_use(holder) from None
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        try:
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
