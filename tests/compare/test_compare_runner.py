"""The harness's scheduling without training: a stand-in for the interpreter plays `otr-megatron train`
and the probe (writes what they write), so dependencies, skipping of finished runs, refusal of a
changed config, failure isolation and the report are checked in a second."""

import json
import stat
import sys

import pytest

from otr_megatron.compare import cli as compare_cli
from otr_megatron.compare.grid import build_plan, parse_sweep
from otr_megatron.compare.report import collect, summarize
from otr_megatron.compare.runner import CompareError, Runner

FAKE = r'''#!{python}
"""Stand-in for `python -W ignore -m otr_megatron.cli train ...` and `-m otr_megatron.compare.probe SPEC`."""
import json, os, sys, yaml
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if "otr_megatron.compare.probe" in args:
    spec = json.load(open(args[-1]))
    res = {{"__warm_start__": {{"iteration": 1, "parity/kl_answer": 0.0}}}}
    for name in spec["runs"]:
        res[name] = {{"iteration": 2, "parity/kl_answer": 0.5 if name.startswith("otr") else 1.0}}
    json.dump(res, open(spec["out"], "w"))
    sys.exit(0)
cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
out = args[args.index("--output-dir") + 1]
if "bad" in json.dumps(cfg["data"]["train"]) and cfg["finetune_iters"] > 0:
    print("config error: data.train: no such file", file=sys.stderr)
    sys.exit(2)
resume = "--resume" in args
ck = os.path.join(out, "checkpoints", "iter_0000030")
# a checkpoint as the train job writes it: shards, then otr_manifest.json (files and sizes), then latest
FILES = {{"common.pt": b"c" * 100, "__0_0.distcp": bytes(range(256)) * 64, "__0_1.distcp": b"s" * 9000,
          ".metadata": b"m" * 10}}
if resume:  # an arm: must find the copied warm-start checkpoint, complete, and the warm start's metrics
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "iter_0000030"
    manifest = json.load(open(os.path.join(ck, "otr_manifest.json")))
    assert manifest["files"] == {{k: len(v) for k, v in FILES.items()}}
    assert all(open(os.path.join(ck, k), "rb").read() == v for k, v in FILES.items())
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines(keepends=True)
    assert lines[0] == '{{"iteration": 30}}\n', lines
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:  # the job keeps the rows up to its checkpoint
        f.write(lines[0] + json.dumps({{"iteration": 31, "loss": cfg["loss"]}}) + "\n")
else:
    os.makedirs(ck, exist_ok=True)
    for k, v in FILES.items():
        open(os.path.join(ck, k), "wb").write(v)
    json.dump({{"iteration": 30, "files": {{k: len(v) for k, v in FILES.items()}}}},
              open(os.path.join(ck, "otr_manifest.json"), "w"))
    open(os.path.join(out, "checkpoints", "latest"), "w").write("iter_0000030\n")
    open(os.path.join(out, "metrics.jsonl"), "w").write('{{"iteration": 30}}\n')
value = {{"sft": 0.6, "otr": 0.7}}.get(cfg["loss"], 0.1) if resume else 0.2
value += 0.01 * cfg["seed"]
if os.environ.get("FAKE_NO_FINAL_EVAL") and resume:  # a resume with nothing to do, as train 6fb6c36 did
    final = None
else:
    final = {{"old/exact_match": value, "old/samples": 400}}
json.dump({{"final_eval": final, "iterations": cfg["pretrain_iters"] + cfg["finetune_iters"]}},
          open(os.path.join(out, "summary.json"), "w"))
open(os.path.join(out, "config.yaml"), "w").write(open(args[args.index("--config") + 1]).read())
'''


def _fake(tmp_path, monkeypatch):
    path = tmp_path / "fake_python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    return str(path), log


def _calls(log):
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines()]


def _plan(out, sweeps=(), overrides=()):
    ov = compare_cli._ab_overrides() + list(compare_cli.QUICK_OVERRIDES) + list(overrides)
    return build_plan(str(out), None, ov, ["sft", "otr"], [1, 2], [parse_sweep(s) for s in sweeps])


def test_runner_order_skip_refuse_and_report(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    plan = _plan(out)
    tasks = Runner(plan, jobs=2, python=python, log=lambda *_: None, probe_rules={"parity": "parity_digit"}).run()
    assert [t.status for t in tasks] == ["done"] * 8
    calls = _calls(log)
    kinds = ["probe" if "otr_megatron.compare.probe" in c else ("arm" if "--resume" in c else "warm") for c in calls]
    assert kinds.count("warm") == 2 and kinds.count("arm") == 4 and kinds.count("probe") == 2
    # each seed's arms ran after its warm start, its probe after its arms
    for seed in (1, 2):
        idx = [i for i, c in enumerate(calls) if f"seed{seed}" in " ".join(c)]
        kinds_s = [kinds[i] for i in idx]
        assert kinds_s[0] == "warm" and kinds_s[-1] == "probe", kinds_s
    table = collect(plan, tasks)
    summ = summarize(plan, table, "sft")
    rows = {r["row"]: r for r in summ["panels"][0]["rows"]}
    assert rows["otr"]["metrics"]["old/exact_match"]["values"] == pytest.approx([0.71, 0.72])
    assert rows["warm start (CE)"]["metrics"]["old/exact_match"]["values"] == pytest.approx([0.21, 0.22])
    assert rows["otr"]["metrics"]["parity/kl_answer"]["mean"] == 0.5
    assert summ["panels"][0]["paired"][0]["metrics"]["old/exact_match"]["mean"] == pytest.approx(0.1)

    # Second invocation: nothing runs.
    n = len(_calls(log))
    tasks = Runner(_plan(out), jobs=2, python=python, log=lambda *_: None, probe_rules={"parity": "parity_digit"}).run()
    assert len(_calls(log)) == n and all(t.status == "skipped-done" for t in tasks)

    # A changed config in the same directory is refused, naming the run.
    with pytest.raises(CompareError, match="different config"):
        Runner(_plan(out, overrides=["finetune_iters=11"]), python=python, log=lambda *_: None).run()


def test_runner_failure_blocks_only_dependents_and_partial_probe_is_redone(tmp_path, monkeypatch):
    python, log = _fake(tmp_path, monkeypatch)
    out = tmp_path / "study"
    plan = _plan(out, sweeps=["data.train=assets:ab_parity_uniform.jsonl,bad.jsonl"])
    lines = []
    tasks = Runner(plan, jobs=1, python=python, log=lines.append).run()
    status = {t.name: t.status for t in tasks}
    assert status["seed1/sft__train=bad"] == "failed" and status["seed1/otr__train=ab_parity_uniform"] == "done"
    assert status["seed1/probe"] == "done" and status["seed2/warm_start"] == "done"
    assert any("no such file" in x for x in lines)  # the tail of the failed run's log is shown
    probe = json.load(open(out / "seed1" / "probe" / "probe.json"))
    assert set(probe) == {"__warm_start__", "sft__train=ab_parity_uniform", "otr__train=ab_parity_uniform"}
    # Rerun: only the failed arms and the (partial) probes run again.
    n = len(_calls(log))
    tasks = Runner(plan, jobs=1, python=python, log=lambda *_: None).run()
    again = _calls(log)[n:]
    assert len(again) == 4 + 2  # 2 bad arms x 2 seeds, 2 probes
    assert all("bad" in " ".join(c) or "otr_megatron.compare.probe" in c for c in again)
