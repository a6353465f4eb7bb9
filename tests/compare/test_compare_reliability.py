"""`otr-megatron compare` keeps every result (issue 17): a run counts only with its result on disk and
none vanishes from the report, a moved study keeps its runs, a value swept twice runs once, seeds
stay in 0..2**63-1 (the train job's range), and Ctrl-C is one line with the running tasks interrupted, not orphaned.

The train job is played by the stand-in of test_compare_runner (writes what `otr-megatron train`
writes, in a second)."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from otr_megatron.compare import cli as compare_cli
from otr_megatron.compare import runner as runner_mod
from otr_megatron.compare.grid import parse_seeds, parse_sweep
from otr_megatron.compare.runner import DONE, Runner
from otr_megatron.train.config import ConfigError

from test_compare_runner import _calls, _fake, _plan  # noqa: E402 (tests/compare is no package)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = {"log": lambda *_: None}


def _run_cli(monkeypatch, python, out, *extra):
    """compare's own main() with the stand-in interpreter for every task."""
    monkeypatch.setattr(runner_mod, "Runner", functools.partial(Runner, python=python))
    return compare_cli.main(["--quick", "-o", str(out), "-j", "1", *extra])


def test_a_finished_arm_without_its_done_marker_is_recorded_not_resumed_again(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    Runner(_plan(out), python=python, **QUIET).run()
    arm = out / "seed1" / "otr"
    os.remove(arm / DONE)  # the harness stopped between the run's end and its marker
    n = len(_calls(log))
    lines = []
    tasks = Runner(_plan(out), python=python, log=lines.append).run()
    assert len(_calls(log)) == n  # nothing resumed again
    assert all(t.status == "skipped-done" for t in tasks)
    assert any("without its done marker" in x for x in lines)
    assert json.load(open(arm / DONE))["key"] == next(t.key for t in tasks if t.dir == str(arm))


def test_an_arm_whose_result_is_lost_is_named_in_results_md_and_the_header_counts_it(tmp_path, monkeypatch, capsys):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    assert _run_cli(monkeypatch, python, out) == 0
    arm = out / "seed1" / "otr__train=ab_parity_uniform"
    # The marker is gone and the summary lost its evaluation (what a resume of a finished run did
    # at 6fb6c36); the harness runs the arm again and the stand-in again writes final_eval: null.
    os.remove(arm / DONE)
    s = json.load(open(arm / "summary.json"))
    json.dump({**s, "final_eval": None}, open(arm / "summary.json", "w"))
    monkeypatch.setenv("FAKE_NO_FINAL_EVAL", "1")
    capsys.readouterr()
    assert _run_cli(monkeypatch, python, out) == 1
    err = capsys.readouterr().err
    assert "seed1/otr__train=ab_parity_uniform" in err and "without results" in err
    md = (out / "results.md").read_text()
    assert md.startswith("# otr-megatron compare: 3 of 4 runs finished")
    assert "Not in these tables" in md and "seed1/otr__train=ab_parity_uniform" in md
    assert "no final evaluation" in md
    assert not (arm / DONE).exists()  # not marked done: the next invocation tries it again
    res = json.load(open(out / "results.json"))
    otr_row = next(r for r in res["panels"][0]["rows"] if r["row"] == "otr")
    assert otr_row["n"] == 1
    paired = res["panels"][0]["paired"][0]["metrics"]["old/exact_match"]
    assert paired["n"] == 1 and paired["seeds"] == [2]  # the paired difference says it has one seed
    study = json.load(open(out / "study.json"))
    assert study["finished_runs"] == 3 and study["planned_runs"] == 4 and len(study["missing_runs"]) == 1


def test_a_done_marker_whose_result_is_gone_runs_the_task_again(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    Runner(_plan(out), python=python, **QUIET).run()
    arm = out / "seed2" / "sft"
    os.remove(arm / "summary.json")
    n = len(_calls(log))
    tasks = Runner(_plan(out), python=python, **QUIET).run()
    again = _calls(log)[n:]
    assert any(str(arm) in " ".join(c) for c in again)
    assert {t.name: t.status for t in tasks}["seed2/sft"] == "done"
    assert json.load(open(arm / "summary.json"))["final_eval"]


def test_a_moved_study_keeps_every_run(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    Runner(_plan(out), python=python, **QUIET).run()
    moved = tmp_path / "elsewhere" / "study"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    n = len(_calls(log))
    tasks = Runner(_plan(moved), python=python, **QUIET).run()
    assert len(_calls(log)) == n and all(t.status == "skipped-done" for t in tasks)


def test_a_study_marked_by_the_older_harness_is_still_recognised(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    runner = Runner(_plan(out), python=python, **QUIET)
    runner.run()
    for t in runner.tasks:  # rewrite the arms' markers with the old hash (output path included)
        if t.kind == "arm":
            d = json.load(open(os.path.join(t.dir, DONE)))
            json.dump({**d, "key": t.run.legacy_key}, open(os.path.join(t.dir, DONE), "w"))
            assert t.run.legacy_key != t.key
    tasks = Runner(_plan(out), python=python, **QUIET).run()
    assert all(t.status == "skipped-done" for t in tasks)


def test_a_value_swept_twice_in_two_spellings_runs_once_and_says_so(tmp_path, monkeypatch, capsys):
    s = parse_sweep("finetune_lr=1e-4,0.0001,3e-4")
    assert s.values == (1e-4, 3e-4) and s.labels == ("1e-4", "3e-4") and s.duplicates == (("0.0001", "1e-4"),)
    assert parse_sweep("x=1,1.0,true").values == (1, True)  # a bool is not the number 1
    assert parse_sweep("data.train=[a.jsonl, a.jsonl]").values == ("a.jsonl",)
    python, log = _fake(tmp_path, monkeypatch)
    assert _run_cli(monkeypatch, python, tmp_path / "s", "--sweep", "finetune_lr=1e-4,0.0001", "--seeds", "1",
                    "--losses", "sft") == 0
    err = capsys.readouterr().err
    assert "0.0001 is the same value as 1e-4; running that arm once" in err
    arms = [c for c in _calls(log) if "--resume" in c]
    assert len(arms) == 1


def test_seeds_are_ascii_integers_in_0_to_2_64(tmp_path):
    assert parse_seeds("0, 9223372036854775807") == [0, 2**63 - 1]
    for bad, word in (("9223372036854775808", "out of range"), ("-1", "not a seed"), ("\u0661", "not a seed"),
                      ("1,1", "twice"), ("1.5", "not a seed"), ("", "integers")):
        with pytest.raises(ConfigError, match=word):
            parse_seeds(bad)
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "compare", "--quick", "--dry-run",
                        "--seeds", "1,18446744073709551616", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "18446744073709551616" in r.stderr, r.stderr


SLOW_TRAIN = r'''#!{python}
"""Stand-in train job that runs until interrupted (SIGINT: exits 130 as the train job does)."""
import os, signal, sys, time
open(os.path.join(os.environ["FAKE_DIR"], f"child.{{os.getpid()}}"), "w").close()
time.sleep(120)
'''

DRIVER = r'''
import functools, sys
from otr_megatron.compare import cli, runner
runner.Runner = functools.partial(runner.Runner, python=sys.argv[1])
sys.exit(cli.main(["--quick", "-o", sys.argv[2], "-j", "2"]))
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_compare_is_one_line_and_stops_its_tasks(tmp_path, sig):
    fake = tmp_path / "slow_python"
    fake.write_text(SLOW_TRAIN.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=ROOT, FAKE_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", DRIVER, str(fake), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("child.*")):  # the warm starts are running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    children = [int(p.name.split(".")[1]) for p in tmp_path.glob("child.*")]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr
    assert "interrupted" in stderr and "repeat the same command" in stderr
    for pid in children:  # no task outlives the harness
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(out.rglob(DONE))  # nothing interrupted is marked done


KILL_DRIVER = r'''
import functools, os, shutil, signal, sys
from otr_megatron.compare import cli, runner
from otr_megatron.train import checkpoint as ckpt
where = sys.argv[3]
calls = []

def dying_copy(src, dst, **kw):  # the harness dies (SIGKILL) halfway through the second file
    calls.append(src)
    if where == "mid-file" and len(calls) == 2:
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[: os.path.getsize(src) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return shutil.copy2(src, dst, **kw)

def dying_point(root, name):  # the harness dies after the rename, before `latest` moves
    os.kill(os.getpid(), signal.SIGKILL)

shutil.copytree = functools.partial(shutil.copytree, copy_function=dying_copy)
if where == "before-latest":
    ckpt.point_latest = dying_point
runner.Runner = functools.partial(runner.Runner, python=sys.argv[1])
sys.exit(cli.main(["--quick", "-o", sys.argv[2], "-j", "1"]))
'''


def _results(study) -> dict:
    """Every run's results and checkpoints by path inside the study, and the report's tables (logs,
    markers, configs and the report's header, which name the study's directory or the time, left out)."""
    out = {"panels": json.load(open(study / "results.json"))["panels"]}
    for p in sorted(study.glob("seed*/**/*")):
        if p.is_file() and p.name not in ("run.log", DONE, "config.yaml", "spec.json"):
            out[str(p.relative_to(study))] = p.read_bytes()
    return out


@pytest.mark.parametrize("where", ["mid-file", "before-latest"])
def test_an_arm_killed_while_copying_its_warm_start_is_copied_again_on_the_rerun(tmp_path, monkeypatch, where):
    """SIGKILL of the harness in the middle of copying a warm-start checkpoint into an arm: no
    ``latest`` names the partial copy (and the train job's --resume finds nothing to continue there),
    and the rerun finishes the study exactly as an uninterrupted one."""
    from otr_megatron.train import checkpoint as ckpt
    from otr_megatron.train.errors import CheckpointError

    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", KILL_DRIVER, python, str(out), where], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    roots = [d / "checkpoints" for d in out.glob("seed*/*") if (d / "checkpoints").is_dir()]
    killed = [c for c in roots if ckpt.read_latest(str(c)) is None]
    assert len(killed) == 1 and "warm_start" not in str(killed[0]), roots  # the first arm, mid-copy
    left = sorted(p.name for p in killed[0].iterdir())
    warm = killed[0].parent.parent / "warm_start" / "checkpoints" / "iter_0000030"
    if where == "mid-file":
        assert left == ["iter_0000030.partial"]
        sizes = {p.name: p.stat().st_size for p in (killed[0] / "iter_0000030.partial").iterdir()}
        assert any(sizes[k] < (warm / k).stat().st_size for k in sizes)  # a file was cut halfway
        with pytest.raises(CheckpointError, match="no checkpoint"):
            ckpt.select_checkpoint(str(killed[0]))  # --resume would not continue a partial copy
    else:
        assert left == ["iter_0000030"]  # renamed complete, not yet named by latest
        assert ckpt.checkpoint_problem(str(killed[0] / "iter_0000030")) is None
    assert not (killed[0].parent / DONE).exists()

    assert _run_cli(monkeypatch, python, out) == 0
    for c in roots:
        assert ckpt.read_latest(str(c)) == "iter_0000030" and ckpt.checkpoint_problem(str(c / "iter_0000030")) is None
    assert not list(out.rglob("*.partial")) and not list(out.rglob("latest.tmp"))
    ref = tmp_path / "reference"
    assert _run_cli(monkeypatch, python, ref) == 0
    got, want = _results(out), _results(ref)
    assert sorted(got) == sorted(want) and got == want
    assert any(k.endswith("probe.json") for k in got) and len([k for k in got if k.endswith("summary.json")]) == 6
