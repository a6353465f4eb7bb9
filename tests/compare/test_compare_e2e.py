"""`otr-megatron compare --quick` end to end (slow): real train subprocesses and the probe; a second
invocation skips every finished task; an arm (warm-start copy + --resume with its loss) gives the
same per-step numbers as the uninterrupted `otr-megatron train` job with that loss."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args, timeout=900):
    cmd = [sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def _steps(recs):
    return {r["iteration"]: r for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_quick_grid_end_to_end(tmp_path):
    out = tmp_path / "q"
    r = _cli("compare", "--quick", "-o", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json", encoding="utf-8"))
    assert [p["panel"] for p in res["panels"]] == ["train=ab_parity_uniform"]
    rows = {x["row"]: x for x in res["panels"][0]["rows"]}
    assert list(rows) == ["warm start (CE)", "sft", "otr"]
    for name, row in rows.items():
        assert row["n"] == 2, name
        for m in ("parity/valid_mass", "parity/greedy_valid", "parity/kl_answer", "old/exact_match", "ood/ce"):
            assert row["metrics"][m]["n"] == 2 and row["metrics"][m]["seeds"] == [1, 2], (name, m)
    assert rows["warm start (CE)"]["metrics"]["parity/kl_answer"]["mean"] == pytest.approx(0.0, abs=1e-12)
    for loss in ("sft", "otr"):  # fine-tuning moved the model away from its warm start
        assert min(rows[loss]["metrics"]["parity/kl_answer"]["values"]) > 0
    assert res["panels"][0]["paired"][0]["row"] == "otr - sft"
    assert os.path.getsize(out / "results.png") > 10_000 and (out / "results.md").read_text().count("| sft |") == 1
    study = json.load(open(out / "study.json", encoding="utf-8"))
    assert study["finished_runs"] == study["planned_runs"] == 4 and not study["failed"]

    # Every arm of a seed starts from the same warm start: identical records up to the boundary.
    seed1 = out / "seed1"
    warm = _records(seed1 / "warm_start" / "metrics.jsonl")
    p = max(x["iteration"] for x in warm)
    for loss in ("sft", "otr"):
        arm = _records(seed1 / f"{loss}__train=ab_parity_uniform" / "metrics.jsonl")
        assert [x for x in arm if x["iteration"] <= p] == warm
        assert all(x["loss_name"] == loss for x in arm if x["kind"] == "train" and x["iteration"] > p)

    # A second invocation finds everything finished and only rebuilds the report.
    again = _cli("compare", "--quick", "-o", str(out), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 of 8 tasks already finished" in again.stdout
    assert not any(line.startswith("start ") for line in again.stdout.splitlines())

    # The arm (warm start copied, resumed with --loss otr) equals the uninterrupted job with --loss otr.
    cfg = out / "configs" / "seed1" / "otr__train=ab_parity_uniform.yaml"
    direct = tmp_path / "direct"
    r = _cli("train", "--config", str(cfg), "--output-dir", str(direct), "resume=false")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = _steps(_records(seed1 / "otr__train=ab_parity_uniform" / "metrics.jsonl"))
    b = _steps(_records(direct / "metrics.jsonl"))
    assert sorted(a) == sorted(b) and len(a) > p
    for it in a:
        for k in ("lm_loss", "otr_loss", "otr_hit_rate", "grad_norm"):
            if k in a[it] or k in b[it]:
                assert a[it][k] == pytest.approx(b[it][k], rel=1e-6, abs=1e-9), (it, k)
    fa = json.load(open(seed1 / "otr__train=ab_parity_uniform" / "summary.json"))["final_eval"]
    fb = json.load(open(direct / "summary.json"))["final_eval"]
    assert fa == pytest.approx(fb, rel=1e-6)
