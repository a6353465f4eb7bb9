"""NeMo-Run path: the same launch as `otr-megatron slurm`, expressed as a `nemo_run.SlurmExecutor`.

For teams whose jobs already go through NeMo-Run (experiments, tunnels, packagers). `nemo_run` is
imported lazily: install it with `pip install nemo-run` (0.11.x needs `leptonai==0.27.3` pinned to
import). NeMo-Run assumes Pyxis/enroot, like the plain sbatch path.

Launch-model mapping (NeMo-Run converts it itself): `launcher="torchrun"` is given
`ntasks_per_node=gpus_per_node` and turns that into one task per node with
`torchrun --nproc-per-node gpus_per_node --node-rank $SLURM_NODEID`; `launcher="srun"` keeps one
task per GPU with no launcher, rank and world size from SLURM_PROCID / SLURM_NTASKS.

Hostile values: the spec is validated exactly as for `otr-megatron slurm`; `job_dir` and the run
name, which NeMo-Run writes into #SBATCH lines, get the same strict patterns; environment values are
passed shell-quoted because NeMo-Run writes `export KEY=VALUE` without quoting; string options in
`**extra` may not contain control characters.
"""

from __future__ import annotations

import shlex
from typing import Any

from otr_megatron.launch.slurm import (
    _JOB_NAME_RE,
    _LOG_DIR_RE,
    SlurmSpec,
    SlurmSpecError,
    check_directive,
    check_text,
    task_script,
)


def _check_options(extra: dict[str, Any]) -> None:
    """No control character in any string (or string inside a list/tuple/dict) passed through to NeMo-Run."""

    def walk(name: str, v: Any) -> None:
        if isinstance(v, str):
            check_text(name, v, "a single-line value")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{name}[{i}]", x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{name} key", k)
                walk(f"{name}[{k!r}]", x)

    for key, value in extra.items():
        walk(f"executor option {key}", value)


def _import_nemo_run():
    try:
        import nemo_run as run
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the NeMo-Run path needs `nemo_run`: pip install nemo-run 'leptonai==0.27.3' "
            f"(or use `otr-megatron slurm`, which needs nothing extra). Import error: {exc}"
        ) from exc
    return run


def slurm_executor(spec: SlurmSpec, *, job_dir: str, tunnel: Any = None, packager: Any = None, **extra: Any):
    """Build a `nemo_run.SlurmExecutor` from a `SlurmSpec`.

    `job_dir` is where NeMo-Run keeps the job's files on the cluster side; `tunnel` defaults to a
    `LocalTunnel(job_dir=job_dir)` (running on the login node); pass `run.SSHTunnel(...)` to submit
    from elsewhere. `packager` defaults to `run.Packager()` (ship nothing: the image has the package). `extra` goes to SlurmExecutor unchanged (qos, exclusive, dependencies, ...).
    """
    spec.validate()
    if spec.account is None:
        raise SlurmSpecError("NeMo-Run's SlurmExecutor requires an account: set SlurmSpec.account / --account")
    check_directive("job_dir", job_dir, _LOG_DIR_RE,
                    "a directory path of letters, digits and _./@+,:=~- (no spaces, quotes, # or %)")
    _check_options(extra)
    run = _import_nemo_run()
    kwargs: dict[str, Any] = dict(
        account=spec.account,
        partition=spec.partition,
        nodes=spec.nodes,
        ntasks_per_node=spec.gpus_per_node,
        gpus_per_node=spec.gpus_per_node,
        time=spec.time,
        container_image=spec.container_image,
        container_mounts=list(spec.container_mounts),
        # NeMo-Run renders `export KEY=VALUE` verbatim: quote the value for the shell.
        env_vars={k: shlex.quote(v) for k, v in spec.env.items()},
        tunnel=tunnel if tunnel is not None else run.LocalTunnel(job_dir=job_dir),
        launcher="torchrun" if spec.launcher == "torchrun" else None,
        exclusive=spec.exclusive or None,
    )
    if spec.launcher == "srun":
        # env:// rendezvous for the srun model: the batch shell exports the head node to every task.
        port = "$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))" if spec.master_port == "auto" else spec.master_port
        kwargs["setup_lines"] = (
            'export MASTER_ADDR="$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"\n'
            f"export MASTER_PORT={port}"
        )
    if spec.qos:
        kwargs["qos"] = spec.qos
    if spec.cpus_per_task:
        kwargs["cpus_per_task"] = spec.cpus_per_task
    # The package is installed in the container: nothing to ship (NeMo-Run's default packager would
    # `git archive` the current directory).
    kwargs["packager"] = packager if packager is not None else run.Packager()
    if spec.requeue:
        kwargs["signal"] = f"B:USR1@{spec.requeue_signal_seconds}"
        kwargs.setdefault("additional_parameters", {})["requeue"] = True
        kwargs["retries"] = spec.max_requeues
    kwargs.update(extra)
    return run.SlurmExecutor(**kwargs)


def script_task(spec: SlurmSpec):
    """A `run.Script` for `spec.command`, written inline so that executables work under both models.

    srun model: the inline script is `task_script(spec)`, which exports RANK / LOCAL_RANK /
    WORLD_SIZE from the SLURM task variables (NeMo-Run sets none of them without a launcher) and
    execs the command. torchrun model: the command itself; NeMo-Run wraps it in torchrun.
    """
    spec.validate()
    run = _import_nemo_run()
    if spec.launcher == "srun":
        return run.Script(inline=task_script(spec))
    return run.Script(inline="exec " + " ".join(shlex.quote(c) for c in spec.command))


def launch(spec: SlurmSpec, *, job_dir: str, name: str | None = None, dryrun: bool = False, **executor_kwargs: Any):
    """Submit (or with `dryrun=True` only render and print) `spec.command` through NeMo-Run."""
    if name is not None:
        check_directive("name", name, _JOB_NAME_RE, "a job name of letters, digits and _.+- only")
    run = _import_nemo_run()
    executor = slurm_executor(spec, job_dir=job_dir, **executor_kwargs)
    return run.run(script_task(spec), executor=executor, name=name or spec.job_name, dryrun=dryrun)
