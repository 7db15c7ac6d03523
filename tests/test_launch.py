"""Launching: the scripts under launch/ print the right commands, refuse what they must, and
really start working multi-rank jobs through the deepspeed launcher, mpirun and (a stand-in) srun.

SLURM is faked with small `scontrol`, `srun` and `sbatch` scripts on PATH: scontrol prints
fixed host names, sbatch hands out job ids and logs its arguments, and srun starts the tasks
locally with the SLURM_* variables real srun sets, so the rank mapping in pipeline/training/dist.py
is exercised for real.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.errors import UserError
from pipeline.training import dist

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "launch" / "run.sh"
MPIRUN_SH = REPO / "launch" / "mpirun.sh"
SLURM = REPO / "launch" / "slurm"
PROBE = "tests.helpers.dist_probe"  # stands in for pipeline.train: init, all_reduce, report

BASE_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}
# Variables of an outer launcher or job that must not leak into the jobs these tests start.
LEAKY = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HOSTFILE",
    "NUM_NODES",
    "NUM_GPUS",
    "NP",
    "DRY_RUN",
    "LAUNCHER",
    "ENTRY",
    "PY",
    "MPIRUN_ARGS",
    "CHAT_CONFIG",
    "RAW_CONFIG",
    "OUT",
    "SBATCH_ARGS",
    "EVAL_ARGS",
    "REPO",
)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in dist.without_launcher(os.environ).items() if k not in LEAKY}
    env.update(BASE_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=60, cwd=REPO) -> subprocess.CompletedProcess:
    """Run with a hard timeout; on expiry kill the whole process group (launchers fork ranks)."""
    env = {k: str(v) for k, v in env.items()}
    p = subprocess.Popen(
        [str(c) for c in cmd],
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{cmd[0]} timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        # Stragglers a launcher left behind in our group die with it.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def dry(cmd, env) -> list[list[str]]:
    r = run(cmd, env)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flag(argv: list[str], name: str) -> str:
    """Value of `name VALUE` or `name=VALUE` in argv."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("steps: 1\n")
    return p


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# launch/run.sh


def test_run_sh_one_node_dry_run(config, tmp_path):
    lines = dry([RUN_SH, "--dry-run", config, "--steps=3", "--lr=1e-4"], clean_env(NUM_GPUS=2))
    assert len(lines) == 1
    argv = lines[0]
    assert argv[0] == f"PYTHONPATH={REPO}"
    assert Path(argv[1]).name == "deepspeed"
    assert flag(argv, "--num_gpus") == "2"
    assert flag(argv, "--master_port") == "29500"
    assert "--hostfile" not in argv and "--num_nodes" not in argv
    assert "--no_local_rank" in argv
    # Everything after the config reaches pipeline.train untouched, in order.
    i = argv.index("--module")
    assert argv[i + 1 :] == ["pipeline.train", str(config), "--steps=3", "--lr=1e-4"]

    # DRY_RUN=1 is the same switch; NUM_GPUS defaults to what nvidia-smi lists.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "nvidia-smi", '#!/bin/sh\nfor i in 0 1 2; do echo "GPU $i: Fake (UUID: x)"; done\n')
    env = clean_env(DRY_RUN=1, MASTER_PORT=1234)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    (argv,) = dry([RUN_SH, config], env)
    assert flag(argv, "--num_gpus") == "3" and flag(argv, "--master_port") == "1234"


def test_run_sh_two_nodes_from_hostfile(config, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two 8-GPU nodes\nnode01 slots=8\n\nnode02 slots=8  # second\nnode03 slots=8\n")
    env = clean_env(HOSTFILE=hostfile, NUM_NODES=2, MASTER_ADDR="node01", MASTER_PORT=29600)
    (argv,) = dry([RUN_SH, "--dry-run", config], env)
    assert flag(argv, "--hostfile") == str(hostfile)
    assert flag(argv, "--num_nodes") == "2"
    assert flag(argv, "--master_addr") == "node01"
    assert flag(argv, "--master_port") == "29600"
    assert "--num_gpus" not in argv  # slots come from the hostfile
    assert argv[-3:] == ["--module", "pipeline.train", str(config)]


def test_run_sh_errors(config, tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node01 slots=8\nnode02 gpus=8\n")
    r = run([RUN_SH, "--dry-run", config], clean_env(HOSTFILE=bad))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "node02 gpus=8" in r.stderr
    assert r.stdout == ""  # nothing printed as if it would run

    r = run([RUN_SH, "--dry-run", tmp_path / "missing.yaml"], clean_env())
    assert r.returncode == 2 and "missing.yaml not found" in r.stderr

    # From a user's own folder, a shipped config is found among the package's, as pipeline.train finds it;
    # a file of the same name in that folder wins.
    r = run([RUN_SH, "--dry-run", "chat.yaml"], clean_env(), cwd=tmp_path)
    assert r.returncode == 0 and f"{REPO}/pipeline/configs/chat.yaml" in r.stdout, r.stderr
    (tmp_path / "chat.yaml").write_text((REPO / "pipeline/configs/chat.yaml").read_text())
    r = run([RUN_SH, "--dry-run", "chat.yaml"], clean_env(), cwd=tmp_path)
    assert r.returncode == 0 and f"{tmp_path}/chat.yaml" in r.stdout and "pipeline/configs" not in r.stdout
    r = run([RUN_SH, "--dry-run", "nope.yaml"], clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and f"looked in {tmp_path} and among the shipped configs" in r.stderr
    assert "demo/raw.yaml" in r.stderr and "first argument of launch/run.sh" in r.stderr

    r = run([RUN_SH, "--dry-run", config], clean_env(NUM_NODES=2))
    assert r.returncode == 2 and "HOSTFILE" in r.stderr

    r = run([RUN_SH, "--help"], clean_env())
    assert r.returncode == 0 and "HOSTFILE" in r.stdout and "examples:" in r.stdout


# ---------------------------------------------------------------------------------------------
# launch/mpirun.sh


def test_mpirun_sh_dry_run(config, tmp_path):
    (argv,) = dry([MPIRUN_SH, "--dry-run", config, "--steps=2"], clean_env(NP=4))
    assert Path(argv[1]).name == "mpirun"
    assert flag(argv, "-np") == "4"
    cores = len(os.sched_getaffinity(0))
    assert flag(argv, "--map-by") == ("slot:OVERSUBSCRIBE" if 4 > cores else "slot")
    assert ("--allow-run-as-root" in argv) == (os.getuid() == 0)
    assert "DS_ACCELERATOR" in [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert argv[argv.index("-u") + 1 :] == ["-m", "pipeline.train", str(config), "--steps=2"]

    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=4\nb slots=2\n")
    (argv,) = dry([MPIRUN_SH, config], clean_env(HOSTFILE=hostfile, DRY_RUN=1))
    assert flag(argv, "--hostfile") == str(hostfile)
    assert flag(argv, "-np") == "6"  # the hostfile's slots
    assert flag(argv, "--map-by") == "slot"  # a cluster with too few slots should fail, not oversubscribe


# ---------------------------------------------------------------------------------------------
# SLURM, faked


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin dir with scontrol/srun/sbatch stand-ins, and the env of a job on 2 nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol: the hosts are whatever FAKE_HOSTS says, as real scontrol would expand them.
    write_exe(
        bin_dir / "scontrol",
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 9\nfor h in $FAKE_HOSTS; do echo "$h"; done\n',
    )
    # srun: start --nodes × --ntasks-per-node local tasks with real srun's per-task variables.
    write_exe(
        bin_dir / "srun",
        f"""#!{sys.executable}
import os, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    k, _, v = args.pop(0)[2:].partition("=")
    opts[k] = v
open(os.environ["FAKE_LOG"], "a").write(" ".join(sys.argv[1:]) + "\\n")
nodes, per = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
procs = []
for node in range(nodes):
    for local in range(per):
        env = dict(os.environ, SLURM_PROCID=str(node * per + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per),
                   SLURM_STEP_NUM_TASKS=str(nodes * per))
        procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
""",
    )
    # sbatch --parsable: ids 101, 102, ... in "ID;cluster" form; each call logged as JSON.
    write_exe(
        bin_dir / "sbatch",
        f"""#!{sys.executable}
import json, os, sys
log = os.environ["FAKE_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
open(log, "a").write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{101 + n}};fakecluster")
""",
    )
    log = tmp_path / "fake.log"
    env = clean_env(
        SLURM_JOB_ID=4242,
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_NNODES=2,
        SLURM_GPUS_ON_NODE=4,
        SLURM_SUBMIT_DIR=REPO,
        FAKE_HOSTS="gpu01 gpu02",
        FAKE_LOG=log,
        HOSTFILE_DIR=tmp_path / "hostfiles",
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env, log


def test_train_sbatch_dry_run_srun(fake_slurm, config):
    env, _ = fake_slurm
    r = run([SLURM / "train.sbatch", config, "--steps=5"], dict(env, DRY_RUN="1"))
    assert r.returncode == 0, r.stderr
    assert "2 node(s) × 4 rank(s) = world 8" in r.stdout
    assert "gpu01 slots=4\ngpu02 slots=4" in r.stdout  # the hostfile, built from scontrol
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    port = str(10000 + 4242 % 50000)
    assert argv[:2] == ["MASTER_ADDR=gpu01", f"MASTER_PORT={port}"]
    i = argv.index("srun")
    assert "--nodes=2" in argv and "--ntasks-per-node=4" in argv and "--kill-on-bad-exit=1" in argv
    assert argv[argv.index("-m", i) + 1 :] == ["pipeline.train", str(config), "--steps=5"]


def test_train_sbatch_dry_run_deepspeed(fake_slurm, config, tmp_path):
    env, _ = fake_slurm
    r = run([SLURM / "train.sbatch", config], dict(env, DRY_RUN="1", LAUNCHER="deepspeed"))
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    # One launcher per node, told its node rank on that node, no ssh between nodes.
    assert "--ntasks-per-node=1" in argv and "--nodes=2" in argv
    assert argv[argv.index("bash") + 1 :][:2] == ["-c", 'exec "$0" --node_rank="$SLURM_NODEID" "$@"']
    assert "--no_ssh" in argv
    assert flag(argv, "--hostfile") == str(tmp_path / "hostfiles" / "hostfile.4242")
    assert flag(argv, "--num_gpus") == "4" and flag(argv, "--master_addr") == "gpu01"
    assert argv[-3:] == ["--module", "pipeline.train", str(config)]
    assert not (tmp_path / "hostfiles").exists()  # a dry run writes nothing


def test_sbatch_scripts_refuse_outside_a_job(config):
    env = clean_env()  # no SLURM_JOB_ID
    for script, args in [
        ("train.sbatch", [config]),
        ("transplant.sbatch", ["r", "c", "o"]),
        ("evaluate.sbatch", ["m"]),
    ]:
        r = run([SLURM / script, *args], dict(env, DRY_RUN="1"))
        assert r.returncode == 1, script
        assert "inside a SLURM job" in r.stderr and "sbatch" in r.stderr
        assert r.stdout == ""


def test_submit_method_dry_run(fake_slurm, config, tmp_path):
    env, log = fake_slurm
    raw = tmp_path / "raw.yaml"
    raw.write_text("steps: 1\n")
    out = tmp_path / "exp"
    lines = dry([SLURM / "submit_method.sh", "--dry-run", config, raw, out], env)
    sb = [l for l in lines if l[0] == "sbatch"]
    assert len(sb) == 4
    chat, rawj, transplant, evaluate = sb
    assert chat[-3:] == [str(SLURM / "train.sbatch"), str(config), f"--out={out}/a-chat"]
    assert rawj[-3:] == [str(SLURM / "train.sbatch"), str(raw), f"--out={out}/a-raw"]
    assert not any(a.startswith("--dependency") for a in chat + rawj)  # the phases run concurrently
    assert flag(transplant, "--dependency") == "afterok:CHAT_JOB_ID:RAW_JOB_ID"
    assert transplant[-4:] == [str(SLURM / "transplant.sbatch"), f"{out}/a-raw", f"{out}/a-chat", f"{out}/transplant"]
    assert flag(evaluate, "--dependency") == "afterok:TRANSPLANT_JOB_ID"
    assert evaluate[-2:] == [str(SLURM / "evaluate.sbatch"), f"{out}/transplant"]
    assert not log.exists()  # sbatch was never called


def test_submit_method_submits_dependency_chain(fake_slurm, config, tmp_path):
    env, log = fake_slurm
    raw = tmp_path / "raw.yaml"
    raw.write_text("steps: 1\n")
    env = dict(
        env,
        CHAT_CONFIG=str(config),
        RAW_CONFIG=str(raw),
        OUT=str(tmp_path / "exp"),
        SBATCH_ARGS="--nodes=4 --partition=gpu",
        EVAL_ARGS="--probe p.jsonl",
    )
    r = run([SLURM / "submit_method.sh"], env)
    assert r.returncode == 0, r.stderr
    assert "chat=101 raw=102 transplant=103 evaluate=104" in r.stdout
    calls = [json.loads(l) for l in log.read_text().splitlines()]
    assert [flag(c, "--job-name") for c in calls] == ["la-chat", "la-raw", "la-transplant", "la-eval"]
    assert all("--parsable" in c for c in calls)
    assert "--nodes=4" in calls[0] and "--partition=gpu" in calls[1]
    assert flag(calls[2], "--dependency") == "afterok:101:102"  # after BOTH phases
    assert flag(calls[3], "--dependency") == "afterok:103"
    assert calls[3][-2:] == ["--probe", "p.jsonl"]

    r = run([SLURM / "submit_method.sh", config, tmp_path / "nope.yaml"], env)
    assert r.returncode == 2 and "nope.yaml not found" in r.stderr


def test_transplant_and_evaluate_sbatch_dry_run(fake_slurm):
    env = dict(fake_slurm[0], DRY_RUN="1")
    (argv,) = dry([SLURM / "transplant.sbatch", "runs/r", "runs/c", "runs/t", "--force"], env)
    assert argv[argv.index("-m") + 1 :] == [
        "pipeline.transplant",
        "--raw",
        "runs/r",
        "--chat",
        "runs/c",
        "--out",
        "runs/t",
        "--force",
    ]
    (argv,) = dry([SLURM / "evaluate.sbatch", "runs/t", "--probe", "p.jsonl"], env)
    assert argv[argv.index("-m") + 1 :] == ["pipeline.evaluate", "--model", "runs/t", "--probe", "p.jsonl"]


# ---------------------------------------------------------------------------------------------
# pipeline/training/dist.py


def test_nodelist_expansion():
    assert dist.expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert dist.expand_nodelist("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert dist.expand_nodelist("r[1-2]n[0-1]") == ["r1n0", "r1n1", "r2n0", "r2n1"]
    assert dist.expand_nodelist("gpu-[009-011]-ib") == ["gpu-009-ib", "gpu-010-ib", "gpu-011-ib"]
    for bad in ("node[1-3", "node[a-b]"):
        with pytest.raises(UserError, match="nodelist"):
            dist.expand_nodelist(bad)


def test_env_from_slurm(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)  # no scontrol: our parser
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NODELIST": "node[03-04]",
    }
    info = dist.setup_distributed_env(env)
    assert info["source"] == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "node03" and env["MASTER_PORT"] == str(10000 + 777)
    assert set(info["filled"]) == set(dist.REQUIRED)

    # A step smaller than the allocation: the step's size and nodes win; set values are kept.
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_JOB_NODELIST": "n[1-4]",
        "SLURM_STEP_NODELIST": "n[3-4]",
        "MASTER_PORT": "6000",
    }
    info = dist.setup_distributed_env(env)
    assert env["WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "n3" and env["MASTER_PORT"] == "6000"
    assert env["LOCAL_RANK"] == "0" and "MASTER_PORT" not in info["filled"]


def test_env_from_slurm_uses_scontrol(monkeypatch, tmp_path):
    write_exe(tmp_path / "scontrol", "#!/bin/sh\necho login-x\necho login-y\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "weird-syntax"}
    dist.setup_distributed_env(env)
    assert env["MASTER_ADDR"] == "login-x"


def test_env_from_mpi():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "7000",
        # mpirun inside an sbatch job sees SLURM's variables too; MPI's are the per-rank ones.
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    info = dist.setup_distributed_env(env)
    assert info["source"] == "openmpi"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["MASTER_ADDR"] == "10.0.0.1"

    env = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = dist.setup_distributed_env(env)
    assert info["source"] == "pmi" and (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "3", "0")
    # srun --mpi=pmi2 gives PMI_* without MPI_LOCALRANKID: SLURM's local id fills in.
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    dist.setup_distributed_env(env)
    assert env["LOCAL_RANK"] == "1"


def test_env_single_and_launcher():
    env = {}
    info = dist.setup_distributed_env(env)
    assert info["source"] == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536

    set_by_launcher = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "9",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    env = dict(set_by_launcher)
    info = dist.setup_distributed_env(env)
    assert info["source"] == "launcher" and info["filled"] == {} and env == set_by_launcher


def test_parse_hostfile(tmp_path):
    p = tmp_path / "hosts"
    p.write_text("# cluster\n\nnode01 slots=8\nnode02   slots = 4   # half node\n")
    assert dist.parse_hostfile(p) == [("node01", 8), ("node02", 4)]
    cases = {
        "node01 slots=8\nnode02\n": ":2",
        "a slots=8\n\n# x\nb slots=eight\n": ":4",
        "a slots=0\n": ":1",
        "a slots=1\na slots=2\n": "listed twice",
    }
    for text, where in cases.items():
        p.write_text(text)
        with pytest.raises(UserError) as e:
            dist.parse_hostfile(p)
        assert f"{p}" in str(e.value) and where in str(e.value)
    p.write_text("# only comments\n")
    with pytest.raises(UserError, match="no hosts"):
        dist.parse_hostfile(p)
    with pytest.raises(UserError, match="missing"):
        dist.parse_hostfile(tmp_path / "missing")


def test_check_hostfile_cli(tmp_path):
    p = tmp_path / "hosts"
    p.write_text("a slots=2\nb slots=x\n")
    r = run([sys.executable, "-m", "pipeline.training.dist", "check-hostfile", p], clean_env())
    assert r.returncode == 2 and r.stderr.startswith(f"error: {p}:2:") and "b slots=x" in r.stderr


# ---------------------------------------------------------------------------------------------
# Real multi-rank starts on CPU (gloo): every launcher path brings up a working process group.


def probe_results(out: Path, world: int, args: list[str]) -> list[dict]:
    recs = sorted((json.loads(p.read_text()) for p in out.glob("rank_*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in recs] == list(range(world))
    for r in recs:
        assert r["world"] == world and r["backend"] == "gloo"
        assert r["sum"] == world * (world + 1) / 2  # the all_reduce saw every rank
        assert r["args"] == args
    return recs


# 4-rank training through the user-facing scripts: 2 pipeline stages × 2 data-parallel replicas.
# name: (script, env, where pipeline/training/dist.py must have found the ranks)
LAUNCHES = {"run.sh": (RUN_SH, {"NUM_GPUS": 4}, "launcher"), "mpirun.sh": (MPIRUN_SH, {"NP": 4}, "openmpi")}


@pytest.fixture(scope="module")
def train_4_ranks(tmp_path_factory):
    """Train the same tiny chat config once per launcher (on first use; runs are cached)."""
    from tests.kit import train as ft

    root = tmp_path_factory.mktemp("launch_train")
    setup = ft.build_setup(root)
    config = ft.write_config(
        root / "chat.yaml", setup, "chat", root / "unused", pipeline_stages=2, steps=4, save_every=4
    )
    done = {}

    def launch(name):
        if name not in done:
            script, extra, _ = LAUNCHES[name]
            run_dir = root / f"run_{name}"
            # mpirun.sh gets no MASTER_*: rank 0 picks them and broadcasts them through mpi4py.
            port = {"MASTER_PORT": free_port()} if name == "run.sh" else {}
            env = clean_env(**port, **extra)
            r = run([script, config, f"--out={run_dir}"], env, timeout=300, cwd=root)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
            done[name] = (run_dir, r.stdout + r.stderr)
        return done[name]

    return launch


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_real_4_rank_training(train_4_ranks, name):
    run_dir, output = train_4_ranks(name)
    assert f"4 rank(s) via {LAUNCHES[name][2]}" in output
    record = json.loads((run_dir / "run.json").read_text())
    assert len(record["stages"]) == 2 and record["batch"]["dp_size"] == 2  # the world was 4
    curve = losses(run_dir)
    assert len(curve) == 4 and all(0 < x < 20 for x in curve)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.multiproc
def test_launchers_train_identically(train_4_ranks):
    """Same config, same layout: the launcher must not change a single number."""
    assert losses(train_4_ranks("mpirun.sh")[0]) == losses(train_4_ranks("run.sh")[0])


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_real_train_sbatch_two_ranks(fake_slurm, tmp_path, launcher):
    """The sbatch script under a faked one-node job: srun (stand-in) starts the tasks and
    pipeline/training/dist.py maps SLURM_* to ranks, or srun starts one deepspeed launcher per node."""
    env, log = fake_slurm
    # The one "node" is named by its address: gloo's rendezvous on the name `localhost` can spend
    # a minute trying IPv6 first, which says nothing about launching.
    env = dict(
        env,
        FAKE_HOSTS="127.0.0.1",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_GPUS_ON_NODE=2,
        MASTER_PORT=free_port(),
        ENTRY=PROBE,
        LAUNCHER=launcher,
    )
    out = tmp_path / "probe"
    out.mkdir()
    r = run([SLURM / "train.sbatch", out, "--phase=chat"], env, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = probe_results(out, 2, ["--phase=chat"])
    assert {x["env"]["MASTER_ADDR"] for x in recs} == {"127.0.0.1"}  # the first (only) host
    assert (tmp_path / "hostfiles" / "hostfile.4242").read_text() == "127.0.0.1 slots=2\n"
    srun_args = log.read_text().split()
    assert ("--ntasks-per-node=2" if launcher == "srun" else "--ntasks-per-node=1") in srun_args


# ---------------------------------------------------------------------------------------------
# Makefile targets (launch/Makefile.targets.mk): `make -n` shows the commands; outputs chain.


def test_make_targets_chain():
    r = run(
        [
            "make",
            "-s",
            "-n",
            "-f",
            "Makefile",
            "-f",
            "launch/Makefile.targets.mk",
            "chat",
            "raw",
            "transplant",
            "eval",
            "data",
            "NUM_GPUS=4",
            "CHAT_RUN=r/c",
            "RAW_RUN=r/r",
            "TRANSPLANT_OUT=r/t",
            "TOKENIZER=tok",
            "TRAIN_ARGS=--steps=9",
        ],
        clean_env(),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()

    def line(prefix):
        (hit,) = [shlex.split(l) for l in lines if prefix in l]
        return hit

    chat = line("launch/run.sh chat.yaml")
    assert chat[0] == "NUM_GPUS=4" and chat[-2:] == ["--out=r/c", "--steps=9"]
    assert line("launch/run.sh raw.yaml")[-2:] == ["--out=r/r", "--steps=9"]
    transplant = line("-m pipeline.transplant")
    assert transplant[transplant.index("-m") + 1 :] == [
        "pipeline.transplant",
        "--raw",
        "r/r",
        "--chat",
        "r/c",
        "--out",
        "r/t",
    ]
    evaluate = line("-m pipeline.evaluate")
    assert flag(evaluate, "--model") == "r/t"
    assert flag(line("-m data_prep raw"), "--tokenizer") == "tok"
