"""sbatch rendering: syntax, launch model, rank arithmetic, requeue, and a loopback rendezvous.

The generated scripts are executed for real with test doubles for `srun`/`scontrol`/`sbatch`
(tests/launch/fake_slurm) that run every task of a step on this host, so the rank logic and the
rendezvous are the generated shell code itself, not a re-implementation.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otr_megatron.launch.slurm import DEFAULT_ENV, SlurmSpec, SlurmSpecError, main, render_sbatch, task_script
from otr_megatron.distributed import free_port

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_slurm"
REPO = HERE.parent.parent
SHAPES = [(1, 8), (4, 8), (8, 8)]


def _job_env(nodes: int, tmp: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{FAKE}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=f"fake[0-{nodes - 1}]",
        SLURM_JOB_ID="77",
        PYTHONPATH=f"{REPO}:{env.get('PYTHONPATH', '')}",
        FAKE_SCONTROL_LOG=str(tmp / "scontrol.log"),
        FAKE_SRUN_LOG=str(tmp / "srun.log"),
    )
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def _bash_n(text: str, tmp: Path) -> None:
    p = tmp / "job.sbatch"
    p.write_text(text)
    res = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_render_shapes(tmp_path, launcher, nodes, gpus):
    spec = SlurmSpec(
        command=["otr-megatron", "bridge", "--recipe", "m.recipes:llama3_70b_sft_config", "otr.num_samples=256"],
        nodes=nodes,
        gpus_per_node=gpus,
        launcher=launcher,
        job_name="otr70b",
        partition="batch",
        account="acct",
        container_image="nvcr.io/nvidia/nemo:26.08",
        container_mounts=["/lustre/data:/data", "/lustre/ckpt:/ckpt:rw"],
        container_workdir="/workspace",
    )
    text = render_sbatch(spec)
    _bash_n(text, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    per_node = gpus if launcher == "srun" else 1
    for expected in (
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={per_node}",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --partition=batch",
        "#SBATCH --account=acct",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --job-name=otr70b",
    ):
        assert expected in lines, expected
    # All #SBATCH lines come before the first command, or sbatch ignores them.
    first_cmd = next(i for i, l in enumerate(lines[1:], 1) if l and not l.startswith("#"))
    assert all(i < first_cmd for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    for key, value in DEFAULT_ENV.items():
        assert f"export {key}={value}" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "--container-image=nvcr.io/nvidia/nemo:26.08" in text
    assert "--container-mounts=/lustre/data:/data,/lustre/ckpt:/ckpt:rw" in text
    body = task_script(spec)
    if launcher == "torchrun":
        assert f"--nproc_per_node={gpus}" in body and '--node_rank="$SLURM_NODEID"' in body
        assert "SLURM_PROCID" not in body  # never mix the two launch models
    else:
        assert "torchrun" not in body
        assert 'RANK="$SLURM_PROCID"' in body and 'LOCAL_RANK="$SLURM_LOCALID"' in body


def _run_job(text: str, tmp: Path, nodes: int, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    script = tmp / "job.sbatch"
    script.write_text(text)
    return subprocess.run(
        ["bash", str(script)], env=_job_env(nodes, tmp, **env), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_srun_rank_arithmetic(tmp_path, nodes, gpus):
    out = tmp_path / "ranks"
    out.mkdir()
    probe = f'echo "$RANK $LOCAL_RANK $WORLD_SIZE $NODE_RANK $SLURM_NODEID $MASTER_ADDR $CUDA_DEVICE_MAX_CONNECTIONS" > {out}/$RANK'
    spec = SlurmSpec(command=["bash", "-c", probe], nodes=nodes, gpus_per_node=gpus, launcher="srun")
    res = _run_job(render_sbatch(spec), tmp_path, nodes)
    assert res.returncode == 0, res.stderr
    rows = sorted((f.read_text().split() for f in out.iterdir()), key=lambda r: int(r[0]))
    assert len(rows) == nodes * gpus
    for rank, row in enumerate(rows):
        r, local, world, node_rank, nodeid, addr, conn = row
        assert int(r) == rank
        assert int(local) == rank % gpus and int(node_rank) == rank // gpus == int(nodeid)
        assert int(world) == nodes * gpus
        assert addr == "127.0.0.1" and conn == "1"
    assert f"--ntasks-per-node={gpus}" in (tmp_path / "srun.log").read_text()


@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_torchrun_node_rank(tmp_path, nodes, gpus):
    """One torchrun per node, each told its node rank from SLURM_NODEID (fake torchrun records argv)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "torchrun"
    record.mkdir()
    (fake_bin / "torchrun").write_text(f'#!/bin/bash\necho "$@" > {record}/$SLURM_NODEID\n')
    (fake_bin / "torchrun").chmod(0o755)
    spec = SlurmSpec(command=["python", "train.py", "--x", "a b"], nodes=nodes, gpus_per_node=gpus, launcher="torchrun",
                     master_port="29511")
    env = _job_env(nodes, tmp_path)
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(spec))
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    seen = sorted(record.iterdir(), key=lambda p: int(p.name))
    assert [int(p.name) for p in seen] == list(range(nodes))
    for p in seen:
        argv = p.read_text().strip()
        assert f"--nnodes={nodes} --nproc_per_node={gpus} --node_rank={p.name} " in argv
        assert "--master_addr=127.0.0.1 --master_port=29511 --no-python python train.py --x a b" in argv


def test_world_size_mismatch_is_refused(tmp_path):
    spec = SlurmSpec(command=["true"], nodes=2, gpus_per_node=4, launcher="srun")
    text = render_sbatch(spec).replace("--ntasks-per-node=4 ", "--ntasks-per-node=3 ")
    res = _run_job(text, tmp_path, 2)
    assert res.returncode == 3 and "WORLD_SIZE=6" in res.stderr


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_loopback_rendezvous_two_nodes(tmp_path, launcher):
    """Two "nodes" on 127.0.0.1 join one gloo job through the generated launch logic and all-reduce."""
    out = tmp_path / "out"
    out.mkdir()
    spec = SlurmSpec(
        command=[sys.executable, str(HERE / "allreduce_probe.py"), str(out)],
        nodes=2,
        gpus_per_node=1,
        launcher=launcher,
        master_port=str(free_port()),
        env={**DEFAULT_ENV, "OMP_NUM_THREADS": "1"},
    )
    res = _run_job(render_sbatch(spec), tmp_path, 2, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [f.read_text().split() for f in sorted(out.iterdir())]
    assert len(rows) == 2
    for rank, row in enumerate(rows):
        r, world, local, node_rank, got, expected = row
        assert (int(r), int(world), int(local), int(node_rank)) == (rank, 2, 0, rank)
        assert float(got) == float(expected) == 3.0


def test_requeue_trap_requeues_and_waits(tmp_path):
    spec = SlurmSpec(command=["bash", "-c", "sleep 1.5; exit 0"], nodes=1, gpus_per_node=1, requeue=True,
                     requeue_signal_seconds=120, max_requeues=2)
    text = render_sbatch(spec)
    _bash_n(text, tmp_path)
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    proc = subprocess.Popen(["bash", str(script)], env=_job_env(1, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "requeueing job 77" in out
    assert "requeue 77" in (tmp_path / "scontrol.log").read_text()
    # Out of requeues: no scontrol call.
    (tmp_path / "scontrol.log").unlink()
    proc = subprocess.Popen(["bash", str(script)], env=_job_env(1, tmp_path, SLURM_RESTART_COUNT="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "not requeueing" in out
    assert not (tmp_path / "scontrol.log").exists()


def test_command_quoting_survives(tmp_path):
    out = tmp_path / "args.txt"
    tricky = ["it's", "$HOME", "a b", '"q"', "x;y"]
    spec = SlurmSpec(command=[sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(repr(sys.argv[1:]))", *tricky],
                     nodes=1, gpus_per_node=1)
    res = _run_job(render_sbatch(spec), tmp_path, 1)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == repr(tricky)


def test_cli_writes_file_and_submits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(tmp_path / "sbatch.log"))
    target = tmp_path / "job.sbatch"
    rc = main(["--config", str(REPO / "configs" / "llama3_70b_4node.yaml"), "--launcher", "torchrun",
               "--partition", "batch", "--account", "a", "--log-dir", str(tmp_path / "logs"), "--requeue",
               "--hf-home", "/shared/hf", "--env", "NCCL_DEBUG=WARN", "--no-env", "NVTE_FUSED_ATTN",
               "-o", str(target), "--submit", "--", "otr-megatron", "bridge", "--recipe", "a.b:c"])
    assert rc == 0
    text = target.read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --job-name=llama3_70b_4node" in text
    assert "export HF_HOME=/shared/hf" in text and "export NCCL_DEBUG=WARN" in text
    assert "NVTE_FUSED_ATTN" not in text
    assert "Submitted batch job 4242" in capsys.readouterr().out
    assert (tmp_path / "logs").is_dir()
    assert str(target) in (tmp_path / "sbatch.log").read_text()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--nodes", "2"], "no command to launch"),
        (["--nodes", "0", "--", "x"], "--nodes 0"),
        (["--time", "soon", "--", "x"], "--time 'soon'"),
        (["--container-image", "img", "--container-mounts", "/a", "--", "x"], "--container-mounts entry '/a'"),
        (["--container-mounts", "/a:/b", "--", "x"], "need --container-image"),
        (["--master-port", "80", "--", "x"], "--master-port '80'"),
        (["--submit", "--", "x"], "--submit needs -o"),
        (["--env", "NOEQUALS", "--", "x"], "--env 'NOEQUALS'"),
        (["--config", "/nonexistent.yaml", "--", "x"], "config file '/nonexistent.yaml' not found"),
    ],
)
def test_cli_errors_are_clear(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_spec_error_type():
    with pytest.raises(SlurmSpecError, match="--launcher 'mpirun'"):
        render_sbatch(SlurmSpec(command=["x"], launcher="mpirun"))


def test_auto_port_is_derived_from_job_id(tmp_path):
    spec = SlurmSpec(command=["bash", "-c", 'echo "$MASTER_PORT" > ' + str(tmp_path / "port")], nodes=1, gpus_per_node=1)
    res = _run_job(render_sbatch(spec), tmp_path, 1, SLURM_JOB_ID="123456")
    assert res.returncode == 0, res.stderr
    assert int((tmp_path / "port").read_text()) == 20000 + 123456 % 20000
    assert re.search(r"MASTER_PORT=\"\$\{MASTER_PORT:-", render_sbatch(spec))
