"""End-to-end `otr-megatron train` (slow): a short run writes metrics/plot/checkpoint, stopping then
`--resume` gives the same per-step numbers as not stopping, and TP=2 gives the TP=1 numbers."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["pretrain_iters=3", "finetune_iters=3", "eval_interval=3", "progress_bar=false", "log_interval=1",
         "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "otr.num_samples=8",
         "data.eval.in_domain=assets:eval_id.jsonl", "plot=false"]


def _cli(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "train", "--device", "cpu",
           "--output-dir", str(out), *SHORT, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


def _run(out, *extra):
    r = _cli(out, *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _metrics(out)


def _error_line(r, code):
    """The failed command printed exactly one error line and no traceback (from any rank)."""
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("otr-megatron train: error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "[rank" not in r.stdout + r.stderr, r.stderr[-3000:]
    return errors[0]


def _train(recs):
    """{iteration: (backpropagated loss, hit rate, grad norm, label CE)} of the training records."""
    return {r["iteration"]: (r["otr_loss"], r.get("otr_hit_rate"), r["grad_norm"], r["lm_loss"])
            for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_short_run_and_exact_resume(tmp_path):
    full = _run(tmp_path / "full")
    assert os.path.isfile(tmp_path / "full" / "checkpoints" / "latest")
    assert sorted(_train(full)) == [1, 2, 3, 4, 5, 6]
    assert any(r["kind"] == "eval" and "in_domain/exact_match" in r for r in full)
    assert all(r.get("otr_hit_rate") is not None for r in full if r["kind"] == "train" and r["iteration"] > 3)
    for it, (loss, _, _, ce) in _train(full).items():  # the CE warm start backpropagates the label CE itself
        assert ce > 0 and (loss == pytest.approx(ce, rel=1e-6) if it <= 3 else loss != pytest.approx(ce, rel=1e-3))

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
        assert a[it][3] == pytest.approx(b[it][3], rel=1e-4, abs=1e-6), (it, a[it], b[it])  # label CE
        if a[it][1] is not None or b[it][1] is not None:  # OTR hit rate (fine-tuning steps only)
            assert a[it][1] == pytest.approx(b[it][1], rel=1e-4, abs=1e-6), (it, a[it], b[it])
    evals = lambda recs: [r["in_domain/ce"] for r in recs if r["kind"] == "eval"]  # noqa: E731
    assert evals(one) == pytest.approx(evals(two), rel=1e-4)


@pytest.mark.slow
def test_divergence_keeps_last_good_checkpoint_and_resume_falls_back_past_damage(tmp_path):
    """Items 2-4 of the reliability issue on the real job. lr 1e30 from the first fine-tuning step:
    the step's weights (|w| ~ 1e29) are refused before they are saved, with one line naming the
    iteration, stage and parameter; `latest` stays at the last good checkpoint. Then that checkpoint
    is damaged (a truncated shard): --resume says so, falls back to the one before and continues
    exactly (the redone pretraining step equals the original)."""
    out = tmp_path / "run"
    r = _cli(out, "save_interval=1", "finetune_lr=1e30")
    line = _error_line(r, 1)
    assert line.startswith("otr-megatron train: error: training diverged at iteration 4 (finetune stage, otr loss, "
                           "lr 5e+29): parameter ")  # warmup: 1e30 x 1/2
    assert "> max_param_abs=1e+06; nothing saved after iteration 3: the latest checkpoint is still " in line
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"
    assert not (ckpts / "iter_0000004").exists()
    first = _train(_metrics(out))
    assert sorted(first) == [1, 2, 3, 4]  # the diverged step is logged, never saved

    shard = max((ckpts / "iter_0000003").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    r = _cli(out, "--resume", "finetune_lr=1e-3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"names {ckpts / 'iter_0000003'}, which is damaged: {shard.name} has 100 bytes" in r.stdout
    assert f"resuming from the newest complete checkpoint {ckpts / 'iter_0000002'} (iteration 2)" in r.stdout
    resumed = _train(_metrics(out))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for i in (0, 2):  # loss and grad norm of the redone iteration 3 (a pretraining step: no hit rate)
        assert first[3][i] == pytest.approx(resumed[3][i], rel=1e-6, abs=1e-9)
    assert all(math.isfinite(v[0]) for v in resumed.values())


@pytest.mark.slow
def test_user_error_in_spawned_workers_is_one_line(tmp_path):
    """--tp 2 (two gloo worker processes): a malformed record is reported by the launcher as one
    line naming file:line, exit 2, without the per-rank tracebacks."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "c"}\n')
    r = _cli(tmp_path / "out", "--tp", "2", f"data.train={bad}")
    assert _error_line(r, 2) == f"otr-megatron train: error: {bad}:2: 'prompt' must be a string, got int (3)"
