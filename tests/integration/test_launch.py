"""Launchers end to end on CPU: `make train GPUS=2`, launch/torchrun.sh as two nodes on this
machine, and launch/slurm.sbatch on a real single-node Slurm that the `slurm` fixture brings up
(Debian's slurm-wlm and munge, installed with apt-get when missing; needs root)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: Path, run_dir: Path, steps: int = STEPS, *more: str) -> list[str]:
    return ["--config", "configs/debug.toml", "--data.path", str(data), "--train.run_dir", str(run_dir),
            "--train.max_steps", str(steps), "--train.device", "cpu", *more]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _cpu_env(**more: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **more}


def test_make_train_gpus_2_runs_two_gloo_ranks(tiny_data, tmp_path):
    # the command `make train GPUS=2` runs, taken from the Makefile itself (make -n: nothing runs)
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    run = tmp_path / "run"
    args = shlex.join(_train_args(tiny_data, run)[2:])  # the config goes in CONFIG=
    make = ["make", "-n", "-s", "train", "GPUS=2", "CONFIG=configs/debug.toml", f"ARGS={args}"]
    plan = subprocess.run(make, cwd=REPO, capture_output=True, text=True, check=True).stdout
    (line,) = [ln for ln in plan.splitlines() if "torch.distributed.run" in ln]
    python, module_flag, module, *rest = shlex.split(line)
    assert (module_flag, module) == ("-m", "torch.distributed.run"), line
    assert rest[:3] == ["--standalone", "--nproc-per-node", "2"], line
    proc = subprocess.run([*TORCHRUN, *rest], cwd=REPO, env=_cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(run)
    assert (summary["world_size"], summary["steps"]) == (2, STEPS)


def test_torchrun_sh_two_nodes_on_one_machine(tiny_data, tmp_path):
    run, port = tmp_path / "run", _free_port()
    env = _cpu_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RUN_ID=f"test-{port}", LOG_DIR=str(tmp_path / "logs"))
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as out:
                nodes.append(subprocess.Popen([REPO / "launch/torchrun.sh", *_train_args(tiny_data, run)],
                                              cwd=REPO, env={**env, "NODE_RANK": str(rank)}, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    output = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0, 0], output
    summary = _summary(run)
    assert (summary["world_size"], summary["steps"]) == (2, STEPS), output
    # LOG_DIR: one folder per node (torchrun's naming), each with its rank's stdout
    assert len(list((tmp_path / "logs").glob(f"test-{port}_*/attempt_0/0/stdout.log"))) == 2


# --- a real single-node Slurm ---------------------------------------------------------------

def _apt_install() -> str | None:
    """Installs slurm-wlm and munge without starting their services; returns why not, or None."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")  # stops the packages from starting their services
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # a clean machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
    finally:
        if own_policy:
            policy.unlink()
    return None if proc.returncode == 0 else f"apt-get install slurm-wlm munge failed: {proc.stderr[-500:]}"


def _processes_with_env(entry: str) -> list[int]:
    """Processes whose environment holds `entry`: the daemons started here and what they ran."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if entry.encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


class Slurm:
    """A slurmctld, a slurmd and a munged of their own (ports, socket, state in `root`), found by
    the commands through SLURM_CONF; /etc/slurm and any Slurm already on the machine are left be."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.outputs: list = []
        host = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(host)
        except OSError:  # the rendezvous goes to the node's name, so it must resolve
            host = "localhost"
        self.node = host
        self.cpus = len(os.sched_getaffinity(0))

    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "munge", "log"):
            (r / sub).mkdir(mode=0o700, exist_ok=True)
        key = r / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(f"""\
ClusterName=launchtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={int(mem_mb * 0.8)} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        r = self.root
        commands = [
            ["munged", "--foreground", "--force", f"--socket={r}/munge/munge.socket",
             f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
             f"--seed-file={r}/munge/seed", f"--log-file={r}/log/munged.log"],
            ["slurmctld", "-D"],
            ["slurmd", "-D", "-N", self.node],
        ]
        for cmd in commands:
            out = (r / "log" / f"{cmd[0]}.out").open("w")
            self.outputs.append(out)
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            time.sleep(0.5)  # munged's socket before slurmctld, slurmctld before slurmd
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip() != "idle":
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"Slurm did not come up:\n{self.logs()}")
            time.sleep(0.5)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)}: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait(self, job_id: str, timeout: float, until=lambda job: False) -> dict[str, str]:
        """Polls the job until it ends (or `until(job)`); a requeued job is not ended."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job) or job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                 "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                         for f in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs[1:]):
            self.run("scancel", "--full", "--user", "root", check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # slurmstepd and job processes outlive slurmd; all of them carry this SLURM_CONF
        left = _processes_with_env(f"SLURM_CONF={self.conf}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in left):
            time.sleep(0.2)  # until they are reaped, so that none shows up after the tests
        for out in self.outputs:
            out.close()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("bringing up Slurm needs root")
    if not all(shutil.which(cmd) for cmd in ("munged", "slurmctld", "slurmd", "sbatch")):
        why = _apt_install()
        if why:
            pytest.skip(why)
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    cluster.write_config()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _sbatch(slurm: Slurm, tmp_path: Path, data: Path, run_dir: Path, steps: int, *more: str) -> str:
    env = _cpu_env(SLURM_CONF=str(slurm.conf), CONFIG="configs/debug.toml", NPROC_PER_NODE="2")
    args = _train_args(data, run_dir, steps, *more)[2:]  # the config comes from CONFIG
    return slurm.run("sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out",
                     f"--cpus-per-task={min(2, slurm.cpus)}", "launch/slurm.sbatch", *args,
                     cwd=REPO, env=env).stdout.strip().split(";")[0]


def _job_output(tmp_path: Path, run_dir: Path, slurm: Slurm) -> str:
    files = sorted(tmp_path.glob("slurm-*.out")) + sorted(run_dir.glob("logs/*/node*.out"))
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}" for f in files) + slurm.logs()


@pytest.mark.slurm
def test_slurm_sbatch_trains_two_ranks(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    job_id = _sbatch(slurm, tmp_path, tiny_data, run, STEPS)
    job = slurm.wait(job_id, timeout=240)
    output = _job_output(tmp_path, run, slurm)
    assert job["JobState"] == "COMPLETED", output
    summary = _summary(run)
    assert (summary["world_size"], summary["steps"]) == (2, STEPS), output
    assert "finished" in (tmp_path / f"slurm-{job_id}.out").read_text()
    # per-rank logs: torchrun's per-node output, its lines marked by rank, and each rank's own
    # files (rank 1 prints nothing when no warning is due)
    assert "[rank0]:" in (run / f"logs/{job_id}/node0.out").read_text()
    assert len(list(run.glob(f"logs/{job_id}/{job_id}_*/attempt_0/*/stdout.log"))) == 2


@pytest.mark.slurm
def test_slurm_sbatch_checkpoints_on_usr1_requeues_and_resumes(slurm, tiny_data, tmp_path):
    run, steps = tmp_path / "run", 300
    job_id = _sbatch(slurm, tmp_path, tiny_data, run, steps, "--train.epochs", "100",
                     "--train.log_every", "1", "--data.batch_size", "64")
    metrics = run / "metrics.jsonl"
    # once a step is logged the ranks' signal handlers are in place
    job = slurm.wait(job_id, timeout=180, until=lambda job: metrics.exists() and metrics.stat().st_size)
    assert job["JobState"] == "RUNNING", _job_output(tmp_path, run, slurm)
    # what Slurm does 120 s before the time limit (#SBATCH --signal=B:USR1@120)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm.wait(job_id, timeout=300)
    output = _job_output(tmp_path, run, slurm)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert "requeueing" in (tmp_path / f"slurm-{job_id}.out").read_text(), output
    resumed = re.search(r"resuming from \S+ \(step (\d+);", (run / f"logs/{job_id}/node0.out").read_text())
    assert resumed and 0 < int(resumed[1]) < steps, output
    summary = _summary(run)
    assert (summary["world_size"], summary["steps"]) == (2, steps), output


@pytest.mark.slurm
def test_slurm_scancel_checkpoints_and_does_not_requeue(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    job_id = _sbatch(slurm, tmp_path, tiny_data, run, 5000, "--train.epochs", "1000",
                     "--train.log_every", "1", "--data.batch_size", "64")
    metrics = run / "metrics.jsonl"
    job = slurm.wait(job_id, timeout=180, until=lambda job: metrics.exists() and metrics.stat().st_size)
    assert job["JobState"] == "RUNNING", _job_output(tmp_path, run, slurm)
    slurm.run("scancel", job_id)  # TERM to every process of the job, then KILL after KillWait
    # the job reads CANCELLED at once; the script decides once srun is back
    script_out, deadline = tmp_path / f"slurm-{job_id}.out", time.monotonic() + 60
    while "not requeued" not in script_out.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(8)  # a requeued job would be eligible again by now (cred_expire=5) and start
    job = slurm.job(job_id)
    output = _job_output(tmp_path, run, slurm)
    assert "stopped by SIGTERM" in script_out.read_text(), output
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", output
    assert (run / "checkpoints/latest").exists() and not (run / "summary.json").exists(), output
