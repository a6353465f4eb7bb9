"""End-to-end `otr-megatron train` (slow): a short run writes metrics/plot/checkpoint, stopping then
`--resume` gives the same per-step numbers as not stopping, and TP=2 gives the TP=1 numbers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["pretrain_iters=3", "finetune_iters=3", "eval_interval=3", "progress_bar=false", "log_interval=1",
         "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "otr.num_samples=8",
         "data.eval.in_domain=assets:eval_id.jsonl", "plot=false"]


def _run(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "train", "--device", "cpu",
           "--output-dir", str(out), *SHORT, *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


def _train(recs):
    return {r["iteration"]: (r["lm_loss"], r.get("otr_hit_rate"), r["grad_norm"]) for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_short_run_and_exact_resume(tmp_path):
    full = _run(tmp_path / "full")
    assert os.path.isfile(tmp_path / "full" / "checkpoints" / "latest")
    assert sorted(_train(full)) == [1, 2, 3, 4, 5, 6]
    assert any(r["kind"] == "eval" and "in_domain/exact_match" in r for r in full)
    assert all(r.get("otr_hit_rate") is not None for r in full if r["kind"] == "train" and r["iteration"] > 3)

    _run(tmp_path / "cut", "stop_at_iteration=4")
    resumed = _run(tmp_path / "cut", "--resume")
    a, b = _train(full), _train(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in (5, 6):
        for x, y in zip(a[it], b[it]):
            assert x == pytest.approx(y, rel=1e-6, abs=1e-9), (it, a[it], b[it])


@pytest.mark.slow
def test_tensor_parallel_job_matches_single_process(tmp_path):
    """Same seed, same data: the per-step losses, hit rates and evals of TP=2 equal TP=1 (the padded
    vocabulary differs between the two layouts and must not matter)."""
    one = _run(tmp_path / "tp1")
    two = _run(tmp_path / "tp2", "--tp", "2")
    a, b = _train(one), _train(two)
    assert sorted(a) == sorted(b)
    for it in a:
        assert a[it][0] == pytest.approx(b[it][0], rel=1e-4, abs=1e-6), (it, a[it], b[it])  # loss
        if a[it][1] is not None or b[it][1] is not None:  # OTR hit rate (fine-tuning steps only)
            assert a[it][1] == pytest.approx(b[it][1], rel=1e-4, abs=1e-6), (it, a[it], b[it])
    evals = lambda recs: [r["in_domain/ce"] for r in recs if r["kind"] == "eval"]  # noqa: E731
    assert evals(one) == pytest.approx(evals(two), rel=1e-4)
