"""Where am I in the job? Rank discovery for every way this project gets launched.

torch.distributed (and so DeepSpeed) starts from five environment variables: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. The `deepspeed` launcher and torchrun set
all five. The other launchers a cluster offers do not:

    srun (SLURM)       SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST
    mpirun (Open MPI)  OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    mpiexec (MPICH)    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS

DeepSpeed's own `--launcher slurm` sets none of them either, and PipelineModule needs
LOCAL_RANK. So before `deepspeed.init_distributed()` we fill in whatever is missing from
the launcher that is present, and never overwrite what a launcher did set. (A lone process
is its own job: it always rendezvouses on loopback, at a free port.)

Run as a module it checks a hostfile, so launch scripts can validate before starting ranks:
    python -m pipeline.training.dist check-hostfile hosts.txt
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import timedelta

from data_prep.errors import UserError, fail_cleanly

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500
# Collectives that wait longer than this raise instead of hanging the job forever. Long enough
# for a slow first step or a checkpoint write on another stage; override with init(timeout_s=).
DEFAULT_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------
# SLURM nodelists: "node[01-03,07],gpu-a1" -> node01 node02 node03 node07 gpu-a1


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"SLURM nodelist: cannot read range {item!r} in {pattern!r}")
        # Zero padding is part of the host name: node[01-03] is node01, not node1.
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(head + str(n).zfill(width) + rest for rest in _expand_one(tail))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed SLURM nodelist, the way `scontrol show hostnames` does."""
    if nodelist.count("[") != nodelist.count("]"):
        raise UserError(f"SLURM nodelist: unbalanced brackets in {nodelist!r}")
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(part))
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a nodelist: `scontrol` when this node has it (it knows every site's syntax),
    our own parser otherwise (containers without SLURM's tools)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=30
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------
# Launcher discovery


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _from_slurm(env) -> dict:
    # Under srun, SLURM_STEP_NUM_TASKS is the size of this step; SLURM_NTASKS may describe the
    # whole allocation when a step uses fewer tasks.
    size = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    found = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": size, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    # Task 0 runs on the first node (block distribution, SLURM's default).
    found["MASTER_ADDR"] = slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"
    # Every rank must agree on the port without talking, so derive it from the job id: two
    # jobs sharing a node (A-Chat and A-Raw run concurrently) then get different ports.
    job = env.get("SLURM_JOB_ID", "")
    found["MASTER_PORT"] = str(10000 + int(job) % 50000) if job.isdigit() else str(DEFAULT_PORT)
    return found


def _mpi_rendezvous(single_node: bool) -> tuple[str, str]:
    """MASTER_ADDR/PORT for an MPI job: rank 0 picks, everyone learns it through MPI."""
    if single_node:
        # Loopback is always right on one node, and rank 0 can't pick a free port alone.
        addr = "127.0.0.1"
    try:
        from mpi4py import MPI
    except ImportError:
        if single_node:
            return addr, str(DEFAULT_PORT)
        raise UserError(
            "MPI job across nodes but mpi4py is not importable: set MASTER_ADDR and MASTER_PORT, or install mpi4py"
        ) from None
    comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        host = "127.0.0.1" if single_node else socket.gethostbyname(socket.gethostname())
        mine = (host, str(_free_port()))
    return comm.bcast(mine, root=0)


def _mpi_local_rank() -> str:
    """This rank's index among the ranks on its host (hostnames are unique per node)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    names = comm.allgather(MPI.Get_processor_name())
    return str(names[: comm.Get_rank()].count(names[comm.Get_rank()]))


def _from_mpi(env, flavor: str) -> dict:
    if flavor == "openmpi":
        rank, size = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    else:  # MPICH / Intel MPI (Hydra) and srun --mpi=pmi2
        rank, size = env["PMI_RANK"], env["PMI_SIZE"]
        # Hydra sets MPI_LOCALRANKID; under srun SLURM_LOCALID says the same. Without either,
        # ask MPI: guessing 0 would put every rank of a node on GPU 0.
        local = env.get("MPI_LOCALRANKID") or env.get("SLURM_LOCALID") or _mpi_local_rank()
        local_size = env.get("MPI_LOCALNRANKS")
    found = {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": local}
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        found["MASTER_ADDR"], found["MASTER_PORT"] = _mpi_rendezvous(local_size == size)
    return found


def setup_distributed_env(env=None) -> dict:
    """Fill in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT where missing.

    Sources, most specific first: the variables already set (deepspeed launcher, torchrun),
    Open MPI, MPICH/PMI, SLURM, and finally a single local process. MPI comes before SLURM
    because `mpirun` inside an sbatch job sees both, and only MPI's numbers are per rank.
    Returns {"source": ..., "filled": {var: value}, "RANK": ..., ...} for the log.
    """
    env = os.environ if env is None else env
    if all(k in env for k in REQUIRED):
        source, found = "launcher", {}
    elif "OMPI_COMM_WORLD_RANK" in env:
        source, found = "openmpi", _from_mpi(env, "openmpi")
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        source, found = "pmi", _from_mpi(env, "pmi")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        source, found = "slurm", _from_slurm(env)
    else:
        source = "single"
        found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        # One process has nobody to agree with, so a MASTER_ADDR/PORT left in the shell (or
        # exported by a CI harness) is not a rendezvous, only a way for two one-process runs
        # on the same machine to fight over one port. Take loopback and a free port instead.
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        found.update(_single_rendezvous())
    filled = {}
    for key in REQUIRED:
        if key not in env and key in found:
            env[key] = filled[key] = str(found[key])
    return {"source": source, "filled": filled, **{k: env.get(k) for k in REQUIRED}}


def _single_rendezvous() -> dict:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


# What a launcher puts in the environment. A process that starts its own one-process jobs (the
# demo) removes them, so its children neither join the parent's job nor share its port.
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")


def without_launcher(env: dict) -> dict:
    """A copy of `env` with no launcher variables: the child is a job of its own."""
    return {k: v for k, v in env.items() if k not in REQUIRED and not k.startswith(LAUNCHER_PREFIXES)}


# DeepSpeed builds its ops on first use (on CPU, the shared-memory communication op, about a minute)
# through torch's extension loader, which holds a `lock` file in the build folder while it builds.
# A process killed mid-build leaves the file, and every later job waits on it forever without a word.
STALE_BUILD_LOCK_S = 600


def stale_build_locks(env=None, now: float | None = None) -> list[tuple[str, float]]:
    """(path, age in s) of DeepSpeed op build locks older than STALE_BUILD_LOCK_S, in the folder
    torch builds extensions in (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<python>_<device>)."""
    import glob
    import time

    env = os.environ if env is None else env
    root = env.get("TORCH_EXTENSIONS_DIR")
    if root:
        pattern = os.path.join(root, "deepspeed_*", "lock")
    else:
        from torch.utils.cpp_extension import get_default_build_root

        pattern = os.path.join(get_default_build_root(), "*", "deepspeed_*", "lock")
    now = time.time() if now is None else now
    found = []
    for path in sorted(glob.glob(pattern)):
        with contextlib.suppress(OSError):  # another process may remove it as we look
            age = now - os.path.getmtime(path)
            if age > STALE_BUILD_LOCK_S:
                found.append((path, age))
    return found


def init(timeout_s: float = DEFAULT_TIMEOUT_S, info: dict | None = None) -> tuple[int, int, int]:
    """Start torch.distributed through DeepSpeed. Returns (rank, world, local).

    `info` is what setup_distributed_env() found (training calls it first, to know the world
    size before it builds the plan); without it the job is discovered here. The timeout turns a
    lost rank into an error on every other rank instead of a silent hang.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    info = info or setup_distributed_env()
    accel = get_accelerator()
    # gloo on CPU: DeepSpeed's CPU accelerator asks for oneCCL, which is rarely installed.
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one warning per machine
        for path, age in stale_build_locks():
            print(
                f"warning: {path} is a build lock left {age / 60:.0f} min ago; if no other process is "
                f"building DeepSpeed's ops, remove it, or this job waits on it forever",
                file=sys.stderr,
                flush=True,
            )
    for attempt in range(3):
        try:
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
            break
        except RuntimeError as e:
            # A free port is only free until someone else binds it: between our probe and the
            # store's bind, another job on the machine may take it. One process can just pick
            # again; ranks of a real job must keep the port they agreed on.
            if info["source"] != "single" or "EADDRINUSE" not in str(e) or attempt == 2:
                raise
            os.environ.update(_single_rendezvous())
            info["filled"].update(MASTER_PORT=os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if accel.device_name() == "cpu":
        _unlink_shm_buffer(rank)
    if rank == 0:
        filled = ", ".join(f"{k}={v}" for k, v in info["filled"].items()) or "nothing"
        print(f"[dist] {world} rank(s) via {info['source']} ({backend}); filled in: {filled}", flush=True)
    return rank, world, int(os.environ["LOCAL_RANK"])


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU allreduce gives each rank of a one-machine job a 69 MB /dev/shm segment
    (deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK, mapped by every rank) and never unlinks it, so
    every such job, finished or killed, leaves 69 MB per rank in RAM until the machine reboots.
    Once every rank has returned from init, every rank has mapped every other's segment, so the
    names are no longer needed: each rank unlinks its own after a barrier. The memory stays mapped
    and is freed when the last rank exits, however it exits."""
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.barrier()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


# ---------------------------------------------------------------------------------------------
# Checks with user-facing errors

_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)$")


def parse_hostfile(path) -> list[tuple[str, int]]:
    """Read a DeepSpeed/Open MPI hostfile: `host slots=N` per line, `#` comments."""
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UserError(f"hostfile {path}: {e.strerror}") from None
    hosts: list[tuple[str, int]] = []
    seen = set()
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOSTFILE_LINE.match(line)
        if m is None:
            raise UserError(f"{path}:{n}: expected `HOST slots=N`, got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise UserError(f"{path}:{n}: slots must be at least 1, got {raw.strip()!r}")
        if host in seen:
            raise UserError(f"{path}:{n}: host {host} is listed twice")
        seen.add(host)
        hosts.append((host, slots))
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts")
    return hosts


@fail_cleanly
def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.training.dist",
        description="Launch-time checks used by launch/*.sh (they fail before any rank starts).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m pipeline.training.dist check-hostfile hosts.txt   # prints hosts and slots\n"
        "  python -m pipeline.training.dist hostnames 'node[01-03,07]'  # expands a nodelist\n",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    hf = sub.add_parser("check-hostfile", help="parse a hostfile, print `host slots` lines")
    hf.add_argument("hostfile")
    nl = sub.add_parser("hostnames", help="expand a SLURM nodelist, one host per line")
    nl.add_argument("nodelist")
    args = ap.parse_args(argv)
    if args.cmd == "check-hostfile":
        hosts = parse_hostfile(args.hostfile)
        for host, slots in hosts:
            print(host, slots)
    else:
        print("\n".join(slurm_hostnames(args.nodelist)))


if __name__ == "__main__":
    main()
