"""Hostile launch values: nothing injected ever runs, and no #SBATCH directive is ever lost.

Rejected values raise SlurmSpecError naming the option, the value (repr) and what is expected.
Accepted values (shell metacharacters where the shell context quotes them) are rendered, submitted
to the fake sbatch (which reads directives like sbatch: tests/launch/fake_slurm/sbatch) and run with
the fake srun/scontrol/torchrun; a sentinel file that every payload would create must never appear.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from otr_megatron.launch.slurm import DEFAULT_ENV, SlurmSpec, SlurmSpecError, main, render_sbatch

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_slurm"
NEWLINE = "batch\ntouch /tmp/otr-injected"


def _fake_sbatch():
    loader = importlib.machinery.SourceFileLoader("fake_sbatch", str(FAKE / "sbatch"))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("fake_sbatch", loader))
    loader.exec_module(mod)
    return mod


def test_fake_sbatch_reads_directives_like_sbatch():
    """The test double itself: quoting, escapes, comments, and the first command ending the scan."""
    read = _fake_sbatch().read_directives
    assert read('#!/bin/bash\n#SBATCH --a=1 --b="x y" # note\n\n# c\n#SBATCH --c=\'q\'\\#r\n') == [
        "--a=1", "--b=x y", "--c=q#r"]
    # What the old renderer produced for --partition $'batch\ntouch /tmp/x': the injected line is a
    # command, so sbatch never sees --account.
    assert read("#!/bin/bash\n#SBATCH --partition=batch\ntouch /tmp/x\n#SBATCH --account=a\n") == ["--partition=batch"]
    assert read("#SBATCH --job-name=myhetjobs\n") == ["<hetjob>", "--job-name=my", "s"]


REJECTED = [
    # (SlurmSpec fields, option named in the error, offending value)
    (dict(job_name="otr\ntouch /tmp/x"), "--job-name", "otr\ntouch /tmp/x"),
    (dict(job_name="otr $(id)"), "--job-name", "otr $(id)"),
    (dict(job_name="my-hetjob"), "--job-name", "my-hetjob"),
    (dict(partition=NEWLINE), "--partition", NEWLINE),
    (dict(partition="batch\r#SBATCH --x"), "--partition", "batch\r#SBATCH --x"),
    (dict(partition="batch;touch"), "--partition", "batch;touch"),
    (dict(partition="b`id`"), "--partition", "b`id`"),
    (dict(partition="a b"), "--partition", "a b"),
    (dict(account="acct\ntouch /tmp/x"), "--account", "acct\ntouch /tmp/x"),
    (dict(account="a'b"), "--account", "a'b"),
    (dict(qos="high\ntouch /tmp/x"), "--qos", "high\ntouch /tmp/x"),
    (dict(qos="$(id)"), "--qos", "$(id)"),
    (dict(time="04:00:00\n"), "--time", "04:00:00\n"),  # `$` in the old pattern matched before a final newline
    (dict(time="04:00:00\ntouch /tmp/x"), "--time", "04:00:00\ntouch /tmp/x"),
    (dict(log_dir="logs\ntouch /tmp/x"), "--log-dir", "logs\ntouch /tmp/x"),
    (dict(log_dir="my logs"), "--log-dir", "my logs"),
    (dict(log_dir='lo"gs'), "--log-dir", 'lo"gs'),
    (dict(log_dir="logs#1"), "--log-dir", "logs#1"),
    (dict(log_dir="logs/%j"), "--log-dir", "logs/%j"),
    (dict(sbatch_extra=["--constraint=h100\ntouch /tmp/x"]), "--sbatch", "--constraint=h100\ntouch /tmp/x"),
    (dict(sbatch_extra=["-C h100"]), "--sbatch", "-C h100"),
    (dict(sbatch_extra=["--comment='a b'"]), "--sbatch", "--comment='a b'"),
    (dict(sbatch_extra=["--comment=a\\b"]), "--sbatch", "--comment=a\\b"),
    (dict(sbatch_extra=["touch"]), "--sbatch", "touch"),
    (dict(sbatch_extra=["hetjob"]), "--sbatch", "hetjob"),
    (dict(nodes=0), "--nodes", 0),
    (dict(nodes="2"), "--nodes", "2"),
    (dict(nodes=2.0), "--nodes", 2.0),
    (dict(nodes=True), "--nodes", True),
    (dict(gpus_per_node=0), "--gpus-per-node", 0),
    (dict(gpus_per_node="8\ntouch /tmp/x"), "--gpus-per-node", "8\ntouch /tmp/x"),
    (dict(cpus_per_task=0), "--cpus-per-task", 0),
    (dict(cpus_per_task="4"), "--cpus-per-task", "4"),
    (dict(requeue_signal_seconds=0), "--requeue-signal-seconds", 0),
    (dict(max_requeues=-1), "--max-requeues", -1),
    (dict(master_port="29500\n"), "--master-port", "29500\n"),
    (dict(master_port="\u0662\u0669\u0665\u0660\u0660"), "--master-port", "\u0662\u0669\u0665\u0660\u0660"),  # isdigit() is True
    (dict(launcher="srun\n"), "--launcher", "srun\n"),
    (dict(container_image="img\ntouch /tmp/x"), "--container-image", "img\ntouch /tmp/x"),
    (dict(container_image=""), "--container-image", ""),
    (dict(container_image="i", container_mounts=["/a:/b\ntouch /tmp/x"]), "--container-mounts entry", "/a:/b\ntouch /tmp/x"),
    (dict(container_image="i", container_workdir="/w\x00"), "--container-workdir", "/w\x00"),
    (dict(env={"K\n": "v"}), "--env key", "K\n"),
    (dict(env={"A B": "v"}), "--env key", "A B"),
    (dict(env={"1A": "v"}), "--env key", "1A"),
    (dict(env={"K": "v\ntouch /tmp/x"}), "--env K", "v\ntouch /tmp/x"),
    (dict(env={"K": "a\tb"}), "--env K", "a\tb"),
    (dict(env={"K": "a\u2028b"}), "--env K", "a\u2028b"),
    (dict(env={"K": "a\x85b"}), "--env K", "a\x85b"),
    (dict(command=["echo", "ok\ntouch /tmp/x"]), "command word 1", "ok\ntouch /tmp/x"),
    (dict(command=["echo\x7f"]), "command word 0", "echo\x7f"),
    (dict(command=["echo", 3]), "command word 1", 3),
    (dict(setup=["echo hi\ntouch /tmp/x"]), "--setup", "echo hi\ntouch /tmp/x"),
]


@pytest.mark.parametrize("fields, flag, value", REJECTED, ids=[f"{r[1]}={r[2]!r}" for r in REJECTED])
def test_rejected_values_name_option_value_and_expectation(fields, flag, value):
    fields = {"command": ["true"], **fields}
    with pytest.raises(SlurmSpecError) as info:
        render_sbatch(SlurmSpec(**fields))
    msg = str(info.value)
    assert msg.startswith(f"{flag} {value!r}: ") and "expected" in msg, msg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--partition", NEWLINE], f"--partition {NEWLINE!r}: contains a control character U+000A ('\\n') at index 5"),
        (["--account", "a\nb"], "--account 'a\\nb'"),
        (["--qos", "q\nb"], "--qos 'q\\nb'"),
        (["--log-dir", "l\nb"], "--log-dir 'l\\nb'"),
        (["--sbatch=--x=1\ntouch /tmp/x"], "--sbatch '--x=1\\ntouch /tmp/x'"),
        (["--env", "K\n=v"], "--env key 'K\\n'"),
        (["--env", "K=v\n"], "--env K 'v\\n'"),
        (["--no-env", "K\n"], "--no-env 'K\\n'"),
        (["--hf-home", "/hf\ntouch /tmp/x"], "--hf-home '/hf\\ntouch /tmp/x'"),
        (["--container-image", "i", "--container-workdir", "/w\n"], "--container-workdir '/w\\n'"),
        (["--setup", "a\nb"], "--setup 'a\\nb'"),
    ],
)
def test_cli_refuses_injection_and_writes_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "job.sbatch"
    assert main([*argv, "-o", str(out), "--", "echo", "x"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "expected" in err, err
    assert not out.exists()


@pytest.mark.parametrize("cluster, needle", [("{nodes: '4'}", "cluster.nodes='4'"), ("{gpus_per_node: 7.5}", "cluster.gpus_per_node=7.5")])
def test_config_counts_must_be_integers(tmp_path, capsys, cluster, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: job\ncluster: {cluster}\n")
    assert main(["--config", str(cfg), "--", "x"]) == 2
    assert needle in capsys.readouterr().err


def _payloads(sentinel: Path) -> list[str]:
    """Values that create `sentinel` if any shell ever evaluates them."""
    s = str(sentinel)
    return [f"$(touch {s})", f"`touch {s}`", f"; touch {s}", f"' ; touch {s} ; '", f'" ; touch {s} ; "',
            f"\\$(touch {s})", f"a b  c && touch {s} | cat", f"x\\'$(touch {s})"]


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_accepted_hostile_values_render_run_inert_and_keep_all_directives(tmp_path, launcher, monkeypatch, capsys):
    sentinel = tmp_path / "INJECTED"
    payloads = _payloads(sentinel)
    out = tmp_path / "out"
    out.mkdir()
    probe = ("import json, os, sys; "
             f"open(os.path.join({str(out)!r}, 'rank' + os.environ['SLURM_PROCID']), 'w').write(json.dumps("
             "{'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in os.environ if k.startswith('HOSTILE_')}}))")
    command = [sys.executable, "-c", probe, *payloads]
    comment = f"--comment=$(touch${{IFS}}{sentinel});`touch${{IFS}}{sentinel}`"
    env_args = [a for i, p in enumerate(payloads) for a in ("--env", f"HOSTILE_{i}={p}")]
    mounts = [f"/data/$(touch {sentinel}):/d", f"/a b/`touch {sentinel}`:/c:ro"]
    target = tmp_path / "job.sbatch"
    argv = ["--nodes", "1", "--gpus-per-node", "2", "--launcher", launcher, "--job-name", "otr-hostile.1",
            "--partition", "batch,debug", "--account", "acct_1", "--qos", "high", "--time", "1-02:03:04",
            "--cpus-per-task", "3", "--log-dir", str(tmp_path / "logs"), "--requeue", "--requeue-signal-seconds", "90",
            "--container-image", f"nvcr.io#nvidia/nemo:26.02$(touch {sentinel})", "--container-mounts", mounts[0],
            "--container-mounts", mounts[1], "--container-workdir", f"/w; touch {sentinel}",
            "--hf-home", f"/shared hf/$(touch {sentinel})", *env_args,
            f"--sbatch={comment}", "--sbatch=--constraint=h100&ib",
            "-o", str(target), "--submit", "--", *command]
    monkeypatch.setenv("PATH", f"{FAKE}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_DIRECTIVES", str(tmp_path / "directives.json"))
    assert main(argv) == 0, capsys.readouterr().err
    assert "Submitted batch job 4242" in capsys.readouterr().out
    per_node = 2 if launcher == "srun" else 1
    # Every directive survives, in order, exactly as written (what sbatch itself would read).
    assert json.loads((tmp_path / "directives.json").read_text()) == [
        "--job-name=otr-hostile.1", "--nodes=1", f"--ntasks-per-node={per_node}", "--gpus-per-node=2",
        "--time=1-02:03:04", f"--output={tmp_path / 'logs'}/%x-%j.out", "--open-mode=append",
        "--partition=batch,debug", "--account=acct_1", "--qos=high", "--cpus-per-task=3", "--exclusive", "--mem=0",
        "--requeue", "--signal=B:USR1@90", comment, "--constraint=h100&ib",
    ]
    assert subprocess.run(["bash", "-n", str(target)]).returncode == 0

    # Run the batch script: the fake srun runs each task; torchrun (fake) just runs the command.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "torchrun").write_text('#!/bin/bash\nwhile [ "$1" != --no-python ]; do shift; done; shift; exec "$@"\n')
    (fake_bin / "torchrun").chmod(0o755)
    run_env = dict(os.environ, PATH=f"{fake_bin}:{FAKE}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="1",
                   SLURM_JOB_NODELIST="fake0", SLURM_JOB_ID="77", FAKE_SRUN_LOG=str(tmp_path / "srun.log"))
    run_env.pop("MASTER_PORT", None)
    res = subprocess.run(["bash", str(target)], env=run_env, capture_output=True, text=True, timeout=60)
    assert not sentinel.exists(), "an injected command ran"
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = sorted(out.iterdir())
    assert [p.name for p in ranks] == [f"rank{r}" for r in range(per_node)]
    for p in ranks:
        got = json.loads(p.read_text())
        assert got["argv"] == payloads  # every word arrives verbatim
        assert got["env"] == {f"HOSTILE_{i}": v for i, v in enumerate(payloads)}
    srun_opts = json.loads((tmp_path / "srun.log").read_text().splitlines()[0])
    assert srun_opts[-3:] == [f"--container-image=nvcr.io#nvidia/nemo:26.02$(touch {sentinel})",
                              "--container-mounts=" + ",".join(mounts), f"--container-workdir=/w; touch {sentinel}"]
    text = target.read_text()
    assert f"export HF_HOME={shlex.quote(f'/shared hf/$(touch {sentinel})')}" in text
    for key, value in DEFAULT_ENV.items():
        assert f"export {key}={shlex.quote(value)}" in text
