"""Training progress for a person at a terminal and for a log file.

At a terminal: a tqdm bar redrawn in place. In a file (SLURM's `--output`, `nohup`, a CI log) a
bar is a string of `\r` states, one per step on a single physical line; instead a plain line is
written at the first step, then every `every_s` seconds, and at the last step, so a 1000-step run
writes a few dozen readable lines with the same facts as the bar.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, desc: str, total: int, initial: int, enabled: bool, every_s: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.desc, self.total, self.step, self.enabled, self.every_s = desc, total, initial, enabled, every_s
        self.tty = self.stream.isatty()
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
                mininterval=0.5,
            )
            if enabled and self.tty
            else None
        )
        self.start, self.start_step, self.last_line = time.monotonic(), initial, None

    def update(self, step: int, **shown: str) -> None:
        """Step `step` is done; `shown` are the figures to show beside it (already formatted)."""
        self.step = step
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)  # drawn at tqdm's own pace, not every step
            return
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.every_s or step == self.total:
            self.last_line = now
            done = step - self.start_step
            elapsed = now - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            figures = " ".join(f"{k} {v}" for k, v in shown.items())
            print(
                f"{self.desc} step {step}/{self.total} ({step / self.total:.0%}) {figures} "
                f"elapsed {_clock(elapsed)} eta {_clock(eta)}",
                file=self.stream,
                flush=True,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
