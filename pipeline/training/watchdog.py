"""Name the rank that stopped, and never hang: a heartbeat per rank in the job's store.

When one rank of a job dies, the others learn it from their next collective: gloo raises
"Connection closed by peer" at once, NCCL and hung peers raise when `dist_timeout_s` runs
out, and the `deepspeed` launcher SIGTERMs every other local rank. None of these says which
rank went first (the launcher even logs the command of its *last* rank), and a SIGTERM that
arrives while a rank waits inside a collective would otherwise be handled only after it.

So each rank bumps a counter every BEAT_S in the TCPStore torch.distributed already runs at
MASTER_ADDR:MASTER_PORT (hosted by rank 0). When something goes wrong on a rank (an exception
or a SIGTERM), it watches the counters for WINDOW_S: the ranks whose counter stood still are
the ones that stopped, and a rank that failed with an error left its message in the store
first. The first verdict written wins, every rank prints that same verdict, and exits non-zero
with os._exit (interpreter teardown after a broken collective can itself hang). If the store
is unreachable, rank 0, which hosts it, is the one that is gone.

Once a verdict is in the store, every rank's thread sees it within BEAT_S and stops its rank,
even one blocked in a collective with a rank that is still alive.

Exit status of a rank: 2 a user error on this rank (`error: ...`), 3 stopped because another
rank failed, 143 SIGTERM from outside, 1 an exception that started on this rank (traceback).

Costs: one thread and two store round trips per rank every BEAT_S; a failing job takes about
WINDOW_S longer to exit, and rank 0 lingers up to LINGER_S so the others can read the verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

from data_prep.errors import EXIT_USER, UserError

BEAT_S = 1.0
WINDOW_S = 5.0  # >> BEAT_S: a live rank bumps its counter several times within it
LINGER_S = 15.0
STORE_TIMEOUT_S = 10.0
PREFIX = "layer_aware/watchdog/"
EXIT_FAILED, EXIT_TERMINATED = 3, 128 + signal.SIGTERM


class StoreGone(Exception):
    pass


class Watchdog:
    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.addr = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        # Our own client connection: the store is thread-safe per connection only behind our lock.
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
            wait_for_workers=False,
        )
        self.lock = threading.Lock()  # one store operation at a time
        self.once = threading.Lock()  # one way out of the process
        self.stop = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    # -- store access ----------------------------------------------------------------------
    def _op(self, fn, *args):
        try:
            with self.lock:
                return fn(*args)
        except Exception as e:  # DistNetworkError, DistStoreError, timeouts: the server is gone
            raise StoreGone(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def _beat(self) -> None:
        self._op(self.store.add, f"{PREFIX}hb/{self.rank}", 1)

    def _counts(self) -> list[int]:
        # add(key, 0) reads a counter atomically, and creates it for a rank that never beat.
        return [self._op(self.store.add, f"{PREFIX}hb/{r}", 0) for r in range(self.world)]

    def _get(self, key: str) -> str | None:
        if not self._op(self.store.check, [PREFIX + key]):
            return None
        return self._op(self.store.get, PREFIX + key).decode()

    def say_failed(self, message: str) -> None:
        """Leave this rank's reason in the store before it goes (best effort)."""
        with contextlib.suppress(StoreGone):
            self._op(self.store.set, f"{PREFIX}exit/{self.rank}", message)

    # -- the verdict -----------------------------------------------------------------------
    def verdict(self, own_error: str | None) -> dict:
        """{"message": ..., "stopped": [ranks], "by": rank that decided}; the same on every rank."""
        try:
            if (v := self._get("verdict")) is not None:
                return json.loads(v)
            before = self._counts()
            end = time.monotonic() + WINDOW_S
            while time.monotonic() < end:
                self._beat()
                time.sleep(BEAT_S)
                if (v := self._get("verdict")) is not None:
                    return json.loads(v)
            after = self._counts()
            stopped = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            reasons = {r: self._get(f"exit/{r}") for r in stopped}
            if stopped:
                parts = [
                    f"rank {r} failed: {reasons[r]}"
                    if reasons[r]
                    else f"rank {r} died without a word (killed by a signal, the OOM killer, or a crash)"
                    for r in stopped
                ]
                message = "; ".join(parts)
            elif own_error:
                message = f"rank {self.rank} failed: {own_error}"
            else:
                message = "every rank is alive; the job was stopped from outside (launcher or scheduler)"
            return self._publish(message, stopped)
        except StoreGone as e:
            if self.rank == 0:
                return {"message": f"the job's store on this rank failed ({e})", "stopped": [], "by": 0}
            return {
                "message": f"rank 0 is gone: the job's store it hosts at {self.addr} is unreachable "
                f"({e}); rank 0 died or its node is down",
                "stopped": [0],
                "by": self.rank,
            }

    def _publish(self, message: str, stopped: list[int]) -> dict:
        """Write this rank's verdict unless another rank's is already there; return the one that holds."""
        mine = json.dumps({"message": message, "stopped": stopped, "by": self.rank})
        return json.loads(self._op(self.store.compare_set, PREFIX + "verdict", "", mine).decode())

    def _leave(self, v: dict, code: int) -> None:
        """Flush, let rank 0's store outlive the others' reading of the verdict, and exit."""
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(StoreGone):
            if self.rank == 0:
                expected = self.world - 1 - len([r for r in v.get("stopped", []) if r != 0])
                end = time.monotonic() + LINGER_S
                while time.monotonic() < end and self._op(self.store.add, PREFIX + "left", 0) < expected:
                    self._beat()
                    time.sleep(BEAT_S)
            else:
                self._op(self.store.add, PREFIX + "left", 1)
        os._exit(code)

    def fail(self, exc: BaseException) -> None:
        """The main thread hit an exception: name the rank at fault, exit non-zero. Never returns."""
        user = isinstance(exc, UserError)
        own = f"error: {exc}" if user else (traceback.format_exception_only(exc)[-1].strip())
        self.say_failed(own)
        with self.once:
            if user:
                # A user error is where it started (it may be raised on this rank only, e.g. rank
                # 0's run.json check): say so at once, so the other ranks stop with this message.
                print(f"error: {exc}", file=sys.stderr)
                v = {"stopped": []}
                with contextlib.suppress(StoreGone):
                    v = self._publish(f"rank {self.rank} failed: {own}", [])
                self._leave(v, EXIT_USER)
            v = self.verdict(own)
            if v["by"] == self.rank and not v["stopped"]:
                traceback.print_exception(exc)  # this rank is where it started: show where
                self._leave(v, 1)
            print(f"error: [rank {self.rank}] stopping: {v['message']} (this rank saw: {own})", file=sys.stderr)
            self._leave(v, EXIT_FAILED)

    def _terminated(self) -> None:
        if not self.once.acquire(blocking=False):
            return  # the main thread is already on its way out
        v = self.verdict(None)
        print(
            f"error: [rank {self.rank}] received SIGTERM (a launcher stops every rank once one exits): {v['message']}",
            file=sys.stderr,
        )
        self._leave(v, EXIT_TERMINATED)

    def _verdict_elsewhere(self) -> None:
        """Another rank has decided: stop this one too, even if it waits in a collective on a
        rank that is still alive (and would otherwise learn nothing until that one exits)."""
        v = self._get("verdict")
        if v is None or not self.once.acquire(blocking=False):
            return
        v = json.loads(v)
        print(f"error: [rank {self.rank}] stopping: {v['message']} (decided by rank {v['by']})", file=sys.stderr)
        self._leave(v, EXIT_FAILED)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        import select

        while not self.stop.is_set():
            with contextlib.suppress(StoreGone):
                self._beat()
                self._verdict_elsewhere()
            ready, _, _ = select.select([self.wake_r], [], [], BEAT_S)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    if signal.SIGTERM in self.wake_r.recv(64):
                        self._terminated()

    def __enter__(self):
        # A Python-level handler makes the C handler write the signal number to the wakeup fd,
        # which reaches our thread even while the main thread waits inside a collective.
        self.old_handler = signal.signal(signal.SIGTERM, lambda *_: None)
        self.old_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self._beat()
        self.thread.start()
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            self.fail(exc)
        self.stop.set()
        self.thread.join()
        signal.set_wakeup_fd(self.old_fd)
        signal.signal(signal.SIGTERM, self.old_handler)
        self.wake_r.close()
        self.wake_w.close()
        return False


@contextlib.contextmanager
def guard(rank: int, world: int):
    """Run a multi-rank job under a Watchdog; a single process needs none."""
    if world == 1:
        yield None
        return
    with Watchdog(rank, world) as w:
        yield w
