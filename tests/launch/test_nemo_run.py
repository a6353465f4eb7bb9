"""NeMo-Run path: executor mapping and NeMo-Run's own dry run (rendered sbatch), when installed.

Needs `pip install nemo-run 'leptonai==0.27.3'`; skipped otherwise. The dry run renders the script
offline (LocalTunnel, no-op packager) in a subprocess with a private NEMORUN_HOME.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

try:
    import nemo_run  # noqa: F401

    HAVE_NEMO_RUN = True
except Exception:  # ImportError, or nemo-run 0.11 with an unpinned leptonai
    HAVE_NEMO_RUN = False

pytestmark = pytest.mark.skipif(not HAVE_NEMO_RUN, reason="nemo_run not installed (pip install nemo-run 'leptonai==0.27.3')")


def _hostile(tmp_path: Path) -> str:
    """An environment value that creates a sentinel file if the shell ever evaluates it."""
    s = tmp_path / "INJECTED"
    return f"$(touch {s}); `touch {s}`; 'q' \"d\" a  b"


def _dryrun(tmp_path: Path, launcher: str) -> str:
    prog = tmp_path / "dryrun.py"
    prog.write_text(textwrap.dedent(f"""
        from otr_megatron.launch.slurm import DEFAULT_ENV, SlurmSpec
        from otr_megatron.launch.nemo_run import launch
        spec = SlurmSpec(command=["otr-megatron", "bridge", "--recipe", "pkg.mod:recipe", "otr.num_samples=256"],
                         nodes=2, gpus_per_node=8, launcher={launcher!r}, account="acct", partition="batch",
                         container_image="nvcr.io/nvidia/nemo:26.02", container_mounts=["/lustre:/lustre"],
                         requeue=True, env={{**DEFAULT_ENV, "HOSTILE": {_hostile(tmp_path)!r}}})
        launch(spec, job_dir={str(tmp_path / "jobs")!r}, dryrun=True)
    """))
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "home"), COLUMNS="400",
               PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, str(prog)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    _assert_hostile_export_inert(out, tmp_path)
    return out


def _assert_hostile_export_inert(out: str, tmp_path: Path) -> None:
    """NeMo-Run writes `export KEY=VALUE` verbatim: the value must arrive quoted, so that bash
    evaluating the rendered line sets exactly the value and runs nothing."""
    line = next(l.strip() for l in out.splitlines() if l.strip().startswith("export HOSTILE="))
    res = subprocess.run(["bash", "-c", line + '\nprintf %s "$HOSTILE"'], capture_output=True, text=True, cwd=tmp_path)
    assert not (tmp_path / "INJECTED").exists(), line
    assert res.returncode == 0 and res.stdout == _hostile(tmp_path), (line, res.stdout, res.stderr)


def test_executor_mapping(tmp_path):
    from otr_megatron.launch.nemo_run import slurm_executor
    from otr_megatron.launch.slurm import SlurmSpec

    ex = slurm_executor(SlurmSpec(command=["x"], nodes=4, gpus_per_node=8, launcher="torchrun", account="a"),
                        job_dir=str(tmp_path))
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node) == (4, 8, 8)
    assert ex.env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    with pytest.raises(ValueError, match="requires an account"):
        slurm_executor(SlurmSpec(command=["x"]), job_dir=str(tmp_path))


def test_hostile_values_are_rejected_or_quoted(tmp_path):
    import shlex

    from otr_megatron.launch.nemo_run import launch, script_task, slurm_executor
    from otr_megatron.launch.slurm import SlurmSpec, SlurmSpecError

    ok = dict(command=["x"], account="a")
    for fields, needle in [
        (dict(partition="batch\ntouch /tmp/x"), "--partition 'batch\\ntouch /tmp/x'"),
        (dict(account="a\nb"), "--account 'a\\nb'"),
        (dict(env={"K": "v\nw"}), "--env K 'v\\nw'"),
        (dict(command=["x", "y\nz"]), "command word 1 'y\\nz'"),
    ]:
        with pytest.raises(SlurmSpecError, match=re.escape(needle)):
            slurm_executor(SlurmSpec(**{**ok, **fields}), job_dir=str(tmp_path))
    with pytest.raises(SlurmSpecError, match=re.escape("command word 1 'y\\nz'")):
        script_task(SlurmSpec(command=["x", "y\nz"]))
    for job_dir in (f"{tmp_path}/a b", f"{tmp_path}/a\nb", f"{tmp_path}/%j"):
        with pytest.raises(SlurmSpecError, match=re.escape(f"job_dir {job_dir!r}: ")):
            slurm_executor(SlurmSpec(**ok), job_dir=job_dir)
    with pytest.raises(SlurmSpecError, match=re.escape("executor option qos 'high\\nx'")):
        slurm_executor(SlurmSpec(**ok), job_dir=str(tmp_path), qos="high\nx")
    with pytest.raises(SlurmSpecError, match=re.escape("executor option additional_parameters['comment'] 'a\\nb'")):
        slurm_executor(SlurmSpec(**ok), job_dir=str(tmp_path), additional_parameters={"comment": "a\nb"})
    with pytest.raises(SlurmSpecError, match=re.escape("name 'x\\ny'")):
        launch(SlurmSpec(**ok), job_dir=str(tmp_path), name="x\ny", dryrun=True)
    value = _hostile(tmp_path)
    ex = slurm_executor(SlurmSpec(**ok, env={"HOSTILE": value}), job_dir=str(tmp_path))
    assert ex.env_vars["HOSTILE"] == shlex.quote(value)


def test_dryrun_torchrun(tmp_path):
    out = _dryrun(tmp_path, "torchrun")
    assert "#SBATCH --nodes=2" in out
    assert "#SBATCH --ntasks-per-node=1" in out
    assert "--nnodes 2 --nproc-per-node 8 --node-rank $SLURM_NODEID" in out
    assert "--container-image nvcr.io/nvidia/nemo:26.02" in out
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out


def test_dryrun_srun(tmp_path):
    out = _dryrun(tmp_path, "srun")
    assert "#SBATCH --ntasks-per-node=8" in out
    assert "torchrun" not in out
    assert "export MASTER_ADDR=" in out and "export MASTER_PORT=" in out
