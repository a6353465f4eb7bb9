"""`otr-megatron slurm [options] [--config X.yaml [KEY=VALUE ...]] [-- <command ...>]`: write a ready sbatch script.

With `--config configs/X.yaml` the node count, GPUs per node and job name come from the file, and
without a command after `--` the command is the `otr-megatron bridge` line derived from the file
(`otr_megatron.launch.bridge_job`): the layout `otr-megatron plan` checked is the one that runs.
`KEY=VALUE` words before `--` override the file, in the grammar of every `otr-megatron` command.

One launch model per script, never mixed (mixing torchrun with one task per GPU and
`$SLURM_PROCID` as node rank is a known public bug):

* `--launcher srun`: one SLURM task per GPU; each task exports RANK / LOCAL_RANK / WORLD_SIZE from
  SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and runs the command directly (env:// rendezvous).
* `--launcher torchrun`: one SLURM task per node; torchrun starts `gpus_per_node` workers with
  `--node_rank=$SLURM_NODEID` and a static rendezvous on the first host of the allocation.

Containers go through Pyxis (`srun --container-image/--container-mounts`). The script exports the
environment Megatron jobs usually need, writes one log per job (`%x-%j.out`), and with `--requeue`
traps the warning signal SLURM sends before the time limit and requeues the job (the training
command must save a checkpoint on SIGTERM, e.g. Megatron's exit-signal handler, to resume).

Hostile values: nothing is written raw. Values that land in `#SBATCH` lines are checked against a
strict pattern per option, because sbatch reads those lines with its own small tokenizer (split at
whitespace, `'`/`"` quotes, `\` escapes, `#` starts a comment, the words `hetjob`/`packjob` start a
new job component) and stops reading directives at the first line that is not a comment, so a
newline in a value would run as a command and silently drop every later directive. Values that land
in shell code (environment values, srun options, each word of the command) are `shlex.quote`d. A
control character (newline, tab, NUL, ...) is refused in every field. `--setup` lines are shell code
by design, written as given, one line each.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("srun", "torchrun")

# Environment for Megatron jobs on H100 clusters (see the project notes on NeMo/Megatron launches).
DEFAULT_ENV: dict[str, str] = {
    # TP/SP communication overlap relies on kernels being queued in issue order.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "TORCH_NCCL_HIGH_PRIORITY": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_GRAPH_REGISTER": "0",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "NVTE_FUSED_ATTN": "1",
}

# Patterns are used with re.fullmatch (`$` would also match before a trailing newline). Digits are
# [0-9]: Python's \d also matches fullwidth and Arabic-Indic digits, which sbatch refuses at submit.
_TIME_RE = re.compile(r"([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){0,2}|[0-9]+")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = r"[A-Za-z0-9_.+-]+"
_JOB_NAME_RE = re.compile(_NAME)
_PARTITION_RE = re.compile(rf"{_NAME}(,{_NAME})*")
# Log directory: a path sbatch takes verbatim (no whitespace, quotes, `\`, `#`; no `%`, which
# starts a filename pattern such as %j).
_LOG_DIR_RE = re.compile(r"[A-Za-z0-9_./@+,:=~-]+")
# Extra sbatch option, long or short form with its value attached: --constraint=h100, -Cvolta. The
# value is printable ASCII without space and without the characters sbatch's directive tokenizer
# interprets (quotes, backslash, #); `$`, backticks and `;` are literal in a directive (bash reads
# the line as a comment, sbatch expands nothing).
_DIRECTIVE_VALUE = r"""(?:(?!["'\\#])[!-~])+"""
_SBATCH_OPT_RE = re.compile(rf"--[A-Za-z][A-Za-z0-9-]*(={_DIRECTIVE_VALUE})?|-[A-Za-z]({_DIRECTIVE_VALUE})?")
_HETJOB_RE = re.compile(r"hetjob|packjob", re.IGNORECASE)


class SlurmSpecError(ValueError):
    """A launch option has a value the script cannot be rendered with."""


def _control_char(value: str) -> str | None:
    """Describe the first control or line-separator character of `value`, or None."""
    for i, c in enumerate(value):
        if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return f"control character U+{ord(c):04X} ({c!r}) at index {i}"
    return None


def check_text(flag: str, value, expected: str = "text") -> str:
    """A string with no control character (a newline would end the script line it is written on)."""
    if not isinstance(value, str):
        raise SlurmSpecError(f"{flag} {value!r}: expected {expected} (a string), got {type(value).__name__}")
    bad = _control_char(value)
    if bad:
        raise SlurmSpecError(f"{flag} {value!r}: contains a {bad}, which would break the script line; "
                             f"expected {expected}")
    return value


def check_directive(flag: str, value, pattern: re.Pattern, expected: str) -> str:
    """A value written into an #SBATCH line: one line, matching `pattern` in full, no het-job word."""
    check_text(flag, value, expected)
    if not pattern.fullmatch(value):
        raise SlurmSpecError(f"{flag} {value!r}: expected {expected}")
    if _HETJOB_RE.search(value):
        raise SlurmSpecError(f"{flag} {value!r}: sbatch reads 'hetjob'/'packjob' in an #SBATCH line as a "
                             f"job-component separator; expected {expected} without those words")
    return value


def check_int(flag: str, value, lo: int, hi: int | None = None) -> int:
    """An integer (not a bool, float or string) in [lo, hi]."""
    rng = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise SlurmSpecError(f"{flag} {value!r}: expected {rng}")
    return value


def check_env_key(flag: str, key) -> str:
    check_text(flag, key, "an environment variable name")
    if not _ENV_KEY_RE.fullmatch(key):
        raise SlurmSpecError(f"{flag} {key!r}: not a valid environment variable name; expected letters, digits "
                             "and _, not starting with a digit")
    return key


@dataclass
class SlurmSpec:
    """Everything that goes into one sbatch script."""

    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 8
    launcher: str = "srun"
    job_name: str = "otr"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int | None = None
    exclusive: bool = True
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    container_workdir: str | None = None
    log_dir: str = "logs"
    master_port: str = "auto"  # "auto": derived from the job id so co-located jobs do not collide
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    requeue: bool = False
    requeue_signal_seconds: int = 300
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)
    sbatch_extra: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Check every field; raise SlurmSpecError naming the option, the value and what is expected."""
        if not isinstance(self.command, (list, tuple)) or not self.command:
            raise SlurmSpecError("no command to launch: put it after `--`, e.g. `-- otr-megatron bridge --recipe ...`")
        for i, word in enumerate(self.command):
            check_text(f"command word {i}", word, "a command-line word")
        if self.launcher not in LAUNCHERS:
            raise SlurmSpecError(f"--launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        check_int("--nodes", self.nodes, 1)
        check_int("--gpus-per-node", self.gpus_per_node, 1, 64)
        if self.cpus_per_task is not None:
            check_int("--cpus-per-task", self.cpus_per_task, 1)
        check_directive("--time", self.time, _TIME_RE, "SLURM time like 04:00:00, 1-00:00:00 or minutes")
        check_directive("--job-name", self.job_name, _JOB_NAME_RE, "a job name of letters, digits and _.+- only")
        if self.partition is not None:
            check_directive("--partition", self.partition, _PARTITION_RE,
                            "a partition name of letters, digits and _.+- (comma-separated for several)")
        if self.account is not None:
            check_directive("--account", self.account, _JOB_NAME_RE, "an account name of letters, digits and _.+- only")
        if self.qos is not None:
            check_directive("--qos", self.qos, _JOB_NAME_RE, "a QOS name of letters, digits and _.+- only")
        check_directive("--log-dir", self.log_dir, _LOG_DIR_RE,
                        "a directory path of letters, digits and _./@+,:=~- (no spaces, quotes, # or %)")
        for opt in self.sbatch_extra:
            check_directive("--sbatch", opt, _SBATCH_OPT_RE,
                            "one sbatch option with its value attached, e.g. --constraint=h100 "
                            "(no spaces, quotes, backslash or #)")
        if not isinstance(self.master_port, str) or not (
            self.master_port == "auto" or (re.fullmatch(r"[0-9]{4,5}", self.master_port) and 1024 <= int(self.master_port) <= 65535)
        ):
            raise SlurmSpecError(f"--master-port {self.master_port!r}: expected 'auto' or a port in 1024..65535")
        if self.container_image is not None:
            check_text("--container-image", self.container_image, "a container image or .sqsh path")
            if not self.container_image or "," in self.container_image:
                raise SlurmSpecError(f"--container-image {self.container_image!r}: expected a non-empty image "
                                     "reference or .sqsh path without commas")
        for m in self.container_mounts:
            check_text("--container-mounts entry", m, "SRC:DST or SRC:DST:FLAGS")
            parts = m.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or "," in m:
                raise SlurmSpecError(f"--container-mounts entry {m!r}: expected SRC:DST or SRC:DST:FLAGS")
        if self.container_workdir is not None:
            check_text("--container-workdir", self.container_workdir, "a directory path inside the container")
        if (self.container_mounts or self.container_workdir) and not self.container_image:
            raise SlurmSpecError("--container-mounts/--container-workdir need --container-image (Pyxis)")
        for key, value in self.env.items():
            check_env_key("--env key", key)
            check_text(f"--env {key}", value, "a value")
        for line in self.setup:
            check_text("--setup", line, "one shell line (repeat --setup for several)")
        check_int("--requeue-signal-seconds", self.requeue_signal_seconds, 1)
        check_int("--max-requeues", self.max_requeues, 0)
        for flag, v in (("--exclusive", self.exclusive), ("--requeue", self.requeue)):
            if not isinstance(v, bool):
                raise SlurmSpecError(f"{flag} {v!r}: expected True or False")

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node if self.launcher == "srun" else 1


def task_script(spec: SlurmSpec) -> str:
    """The shell text each SLURM task runs (inside the container, if any).

    Kept separate so tests can evaluate it with simulated SLURM variables.
    """
    cmd = " ".join(shlex.quote(c) for c in spec.command)
    if spec.launcher == "srun":
        lines = [
            'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"',
            f'export LOCAL_WORLD_SIZE={spec.gpus_per_node} NODE_RANK="$SLURM_NODEID"',
            f'if [ "$WORLD_SIZE" -ne $(( SLURM_JOB_NUM_NODES * {spec.gpus_per_node} )) ]; then '
            f'echo "otr-launch: WORLD_SIZE=$WORLD_SIZE but expected nodes*gpus=$(( SLURM_JOB_NUM_NODES * {spec.gpus_per_node} ))" >&2; exit 3; fi',
            f"exec {cmd}",
        ]
    else:
        lines = [
            'if [ "$SLURM_NTASKS" -ne "$SLURM_JOB_NUM_NODES" ]; then '
            'echo "otr-launch: torchrun needs one task per node, got SLURM_NTASKS=$SLURM_NTASKS for $SLURM_JOB_NUM_NODES nodes" >&2; exit 3; fi',
            'export NODE_RANK="$SLURM_NODEID"',
            f'exec torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node={spec.gpus_per_node} '
            '--node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" '
            f"--no-python {cmd}",
        ]
    return "\n".join(lines)


def srun_command(spec: SlurmSpec) -> list[str]:
    """srun arguments (before `bash -c`), one task per GPU or per node."""
    args = [
        "srun",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.ntasks_per_node}",
        "--kill-on-bad-exit=1",
    ]
    if spec.container_image:
        args.append(f"--container-image={spec.container_image}")
        if spec.container_mounts:
            args.append(f"--container-mounts={','.join(spec.container_mounts)}")
        if spec.container_workdir:
            args.append(f"--container-workdir={spec.container_workdir}")
    return args


def render_sbatch(spec: SlurmSpec) -> str:
    """Render the full sbatch script text."""
    spec.validate()
    sb = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.ntasks_per_node}",
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        f"#SBATCH --time={spec.time}",
        f"#SBATCH --output={spec.log_dir}/%x-%j.out",
        "#SBATCH --open-mode=append",
    ]
    if spec.partition:
        sb.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        sb.append(f"#SBATCH --account={spec.account}")
    if spec.qos:
        sb.append(f"#SBATCH --qos={spec.qos}")
    if spec.cpus_per_task:
        sb.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    if spec.exclusive:
        sb += ["#SBATCH --exclusive", "#SBATCH --mem=0"]
    if spec.requeue:
        sb += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{spec.requeue_signal_seconds}"]
    sb += [f"#SBATCH {x}" for x in spec.sbatch_extra]

    body = [
        "",
        f"# Rendered by `otr-megatron slurm` (launcher: {spec.launcher}, "
        f"{spec.nodes} node(s) x {spec.gpus_per_node} GPU(s), {spec.ntasks_per_node} task(s) per node).",
        "set -euo pipefail",
        "",
        "# Rendezvous: the first host of the allocation. pipefail is off inside the substitution: `head`",
        "# closing the pipe early must not turn scontrol's SIGPIPE into a failed job.",
        'MASTER_ADDR="$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        'if [ -z "$MASTER_ADDR" ]; then echo "otr-launch: no host from scontrol for $SLURM_JOB_NODELIST" >&2; exit 1; fi',
    ]
    if spec.master_port == "auto":
        body.append('MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}"')
    else:
        body.append(f"MASTER_PORT={spec.master_port}")
    body += [
        "export MASTER_ADDR MASTER_PORT",
        f"export GPUS_PER_NODE={spec.gpus_per_node}",
        "",
        "# Environment for Megatron jobs.",
    ]
    body += [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]
    if spec.setup:
        body += ["", "# Setup."] + list(spec.setup)
    body += [
        "",
        'echo "otr-launch: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NUM_NODES:-?} node(s), '
        'master ${MASTER_ADDR}:${MASTER_PORT}, restart ${SLURM_RESTART_COUNT:-0}"',
        "",
        "# What each task runs.",
        f"OTR_TASK_SCRIPT={shlex.quote(task_script(spec))}",
        "",
    ]
    srun = " ".join(shlex.quote(a) for a in srun_command(spec)) + ' bash -c "$OTR_TASK_SCRIPT"'
    if spec.requeue:
        body += [
            "# Requeue: SLURM sends USR1 to this shell before the time limit; requeueing ends the job",
            "# steps with SIGTERM (the training command should save a checkpoint then) and restarts the",
            "# job, which resumes from the latest checkpoint.",
            "otr_requeue() {",
            f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {spec.max_requeues} ]; then',
            '    echo "otr-launch: time limit near, requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "  else",
            f'    echo "otr-launch: time limit near, {spec.max_requeues} requeue(s) already used; not requeueing"',
            "  fi",
            "}",
            "trap otr_requeue USR1",
            "",
            f"{srun} &",
            "OTR_STEP_PID=$!",
            "# `wait` returns early when a trapped signal arrives: wait again for the step to finish.",
            'while true; do',
            '  set +e; wait "$OTR_STEP_PID"; rc=$?; set -e',
            '  if kill -0 "$OTR_STEP_PID" 2>/dev/null; then continue; fi',
            '  exit "$rc"',
            "done",
        ]
    else:
        body.append(srun)
    return "\n".join(sb + body) + "\n"


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        if "=" not in item:
            raise SlurmSpecError(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[check_env_key("--env key", k)] = v
    return env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="otr-megatron slurm",
        description="Write an sbatch script that launches COMMAND on a SLURM cluster.",
        epilog="examples: otr-megatron slurm --config configs/llama3_70b_4node.yaml --partition batch --account acct "
        "--container-image nvcr.io/nvidia/nemo:26.08 -o job.sbatch train.global_batch_size=256   "
        "(the Bridge command derived from the file);   otr-megatron slurm --nodes 4 -o job.sbatch -- "
        "otr-megatron bridge --recipe megatron.bridge.recipes.llama:llama3_70b_sft_config otr.num_samples=256",
    )
    ap.add_argument("--config", help="configs/*.yaml: nodes, GPUs per node, job name and (without a command "
                    "after --) the Bridge command from it; KEY=VALUE words before -- override it")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--launcher", choices=LAUNCHERS, default="srun")
    ap.add_argument("--job-name")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--qos")
    ap.add_argument("--time", default="04:00:00")
    ap.add_argument("--cpus-per-task", type=int)
    ap.add_argument("--no-exclusive", action="store_true", help="share nodes (no --exclusive / --mem=0)")
    ap.add_argument("--container-image", help="Pyxis image, e.g. nvcr.io/nvidia/nemo:26.08 (Bridge) or nemo:26.02 (NeMo 2.0), or a .sqsh file")
    ap.add_argument("--container-mounts", action="append", default=[], help="SRC:DST[:FLAGS], comma list or repeated")
    ap.add_argument("--container-workdir")
    ap.add_argument("--log-dir", default="logs", help="directory for %%x-%%j.out job logs (must exist at submit time)")
    ap.add_argument("--master-port", default="auto")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE to export (overrides defaults)")
    ap.add_argument("--no-env", action="append", default=[], help="KEY of a default variable to leave unset")
    ap.add_argument("--hf-home", help="HF_HOME on a shared filesystem (also sets TRANSFORMERS_OFFLINE=1)")
    ap.add_argument("--setup", action="append", default=[], help="shell line run in the batch shell before launch (written as given: it is shell code; one line each)")
    ap.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option, e.g. --sbatch=--constraint=h100")
    ap.add_argument("--requeue", action="store_true", help="requeue before the time limit and resume")
    ap.add_argument("--requeue-signal-seconds", type=int, default=300)
    ap.add_argument("--max-requeues", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="write a --config job the planner says does not fit")
    ap.add_argument("--no-bridge-check", action="store_true",
                    help="do not build the --config job's Bridge recipe on this machine (where Bridge is installed)")
    ap.add_argument("-o", "--output", help="write the script here (default: stdout)")
    ap.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="[KEY=VALUE ...] -- COMMAND ...")
    return ap


def preflight_config(ns: argparse.Namespace, overrides: list[str], derive_command: bool) -> tuple[object, list[str], str]:
    """The `--config` job checked before anything is written (`otr_megatron/config/cluster_job.py`: the
    schema, the OTR settings, the layout against the model, the memory verdict unless --force; and,
    where Megatron-Bridge is installed and the command is the one derived from the file, the recipe
    built and validated on CPU). Returns (the checked ClusterJob, command or [], what was checked, in
    words)."""
    from otr_megatron.config.cluster_job import JobConfigError, load_cluster_job, preflight
    from otr_megatron.launch.bridge_job import BridgeJobError, bridge_command

    try:
        job = load_cluster_job(ns.config, overrides, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node)
        budget = preflight(job, force=ns.force)
        command = bridge_command(job.cfg) if derive_command else []
    except (JobConfigError, BridgeJobError) as e:
        msg = str(e)
        raise SlurmSpecError(msg if msg.startswith(ns.config) else f"--config {ns.config}: {msg}") from None
    checked = ["the schema, OTR settings and layout"]
    if budget is not None:
        from otr_megatron.planning.budget import GIB

        checked.append(f"memory {budget.total_otr / GIB:.1f} of {job.layout.gpu_memory_gib:g} GiB per GPU"
                       + ("" if budget.fits() else " (DOES NOT FIT; --force)"))
    if derive_command:
        checked.append(_bridge_check(ns, job))
    return job, command, "; ".join(checked)


def _bridge_check(ns: argparse.Namespace, job) -> str:
    if ns.no_bridge_check:
        return "the Bridge recipe not built (--no-bridge-check)"
    if importlib.util.find_spec("megatron.bridge") is None:
        return "the Bridge recipe not built (Megatron-Bridge is not installed here)"
    from otr_megatron.bridge.cli import BridgeCLIError
    from otr_megatron.bridge.preflight import check_job

    try:
        return check_job(job)
    except BridgeCLIError as e:
        raise SlurmSpecError(f"--config {ns.config}: the Bridge command does not build: {' '.join(str(e).split())} "
                             "(--no-bridge-check skips this check)") from None


def spec_from_args(ns: argparse.Namespace) -> tuple[SlurmSpec, str]:
    """Turn parsed options (plus an optional config file and its overrides) into a spec, and say what
    the preflight checked ("" without --config)."""
    # [KEY=VALUE ...] [-- COMMAND ...]: with --config the words before `--` (all of them if there is no
    # `--`) override the file; without it they are the command, as `--` is optional there.
    words = list(ns.command)
    if "--" in words:
        overrides, command = words[: words.index("--")], words[words.index("--") + 1:]
    else:
        overrides, command = (words, []) if ns.config else ([], words)
    nodes, gpus, name = ns.nodes, ns.gpus_per_node, ns.job_name
    if overrides and not ns.config:
        raise SlurmSpecError(f"{overrides[0]!r} before `--`: KEY=VALUE overrides need --config")
    checked = ""
    if ns.config:
        job, derived, checked = preflight_config(ns, overrides, derive_command=not command)
        command = command or derived
        nodes, gpus = job.layout.nodes, job.layout.gpus_per_node  # the command line's counts win there
        name = name or job.cfg.get("name")
    env = dict(DEFAULT_ENV)
    if ns.hf_home:
        env["HF_HOME"] = check_text("--hf-home", ns.hf_home, "a directory path")
        env["TRANSFORMERS_OFFLINE"] = "1"
    for key in ns.no_env:
        env.pop(check_env_key("--no-env", key), None)
    env.update(_parse_env(ns.env))
    mounts = [m for item in ns.container_mounts for m in item.split(",") if m]
    return SlurmSpec(
        command=command,
        nodes=nodes if nodes is not None else 1,
        gpus_per_node=gpus if gpus is not None else 8,
        launcher=ns.launcher,
        job_name=name or "otr",
        partition=ns.partition,
        account=ns.account,
        qos=ns.qos,
        time=ns.time,
        cpus_per_task=ns.cpus_per_task,
        exclusive=not ns.no_exclusive,
        container_image=ns.container_image,
        container_mounts=mounts,
        container_workdir=ns.container_workdir,
        log_dir=ns.log_dir,
        master_port=str(ns.master_port),
        env=env,
        requeue=ns.requeue,
        requeue_signal_seconds=ns.requeue_signal_seconds,
        max_requeues=ns.max_requeues,
        setup=list(ns.setup),
        sbatch_extra=list(ns.sbatch),
    ), checked


def submit(script_path: str, log_dir: str) -> str:
    """Run `sbatch script_path` and return its output (the job id line)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmSpecError("--submit: `sbatch` is not on PATH; run this on a SLURM login node or submit the file yourself")
    Path(log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create the log directory
    res = subprocess.run([sbatch, script_path], capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmSpecError(f"sbatch {script_path} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def write_script(path: str, text: str) -> None:
    """Write the script whole or not at all: a temporary file next to `path`, then a rename, so a full
    disk or an interrupt leaves no partial script (and an existing one untouched). A special file
    (`/dev/stdout`) is written directly. Errors are one SlurmSpecError naming the path."""
    if os.path.isdir(path):
        raise SlurmSpecError(f"-o {path!r}: is a directory; expected the path of the script file to write, "
                             f"e.g. {os.path.join(path, 'job.sbatch')}")
    data = text.encode("utf-8")
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(data)
            return
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        reason = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise SlurmSpecError(f"-o {path!r}: cannot write the script ({reason}); nothing was written") from None


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec, checked = spec_from_args(ns)
        text = render_sbatch(spec)
        if ns.submit and not ns.output:
            raise SlurmSpecError("--submit needs -o/--output FILE so the submitted script is kept")
        if ns.output:
            write_script(ns.output, text)
            print(f"otr-megatron slurm: wrote {ns.output}" + (f" (checked: {checked})" if checked else ""),
                  file=sys.stderr)
        else:
            sys.stdout.write(text)
            if checked:
                print(f"otr-megatron slurm: checked: {checked}", file=sys.stderr)
        if ns.submit:
            print(submit(ns.output, spec.log_dir))
    except SlurmSpecError as exc:
        print(f"otr-megatron slurm: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
