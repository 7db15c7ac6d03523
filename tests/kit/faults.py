"""Faults for the reliability tests, injected around the real entry point (never inside it).

tests/helpers/train_with_faults.py installs these, then runs `pipeline.train.main`:
    LAYER_AWARE_TEST_DIE_RANK=r LAYER_AWARE_TEST_DIE_STEP=n   rank r SIGKILLs itself after step n,
                                                              as the OOM killer or a lost node would
    LAYER_AWARE_TEST_PAUSE_IN_SAVE=s                          rank 0 waits s seconds between the last
                                                              DeepSpeed file of a checkpoint and its
                                                              record.json, so a test can kill it there
"""

from __future__ import annotations

import os
import signal
import time


def install_from_env() -> None:
    die_rank, die_step = os.environ.get("LAYER_AWARE_TEST_DIE_RANK"), os.environ.get("LAYER_AWARE_TEST_DIE_STEP")
    if die_rank is not None and die_rank == os.environ.get("RANK", "0"):
        from pipeline.training import engine

        build = engine.build_engine

        def build_and_die(plan, rank):
            eng = build(plan, rank)
            step, train_batch = [0], eng.engine.train_batch

            def counted(*a, **kw):
                out = train_batch(*a, **kw)
                step[0] += 1
                if step[0] == int(die_step):
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            eng.engine.train_batch = counted
            return eng

        engine.build_engine = build_and_die
    pause = float(os.environ.get("LAYER_AWARE_TEST_PAUSE_IN_SAVE", 0))
    if pause:
        from pipeline.rundir import RunDir

        write = RunDir.write_record

        def paused(self, step):
            time.sleep(pause)
            write(self, step)

        RunDir.write_record = paused
