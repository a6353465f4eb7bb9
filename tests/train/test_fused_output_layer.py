"""`otr.fuse_output_layer=true` in the train job: the same per-step numbers and evaluations as without it.

The CE warm start (the "sft" estimator) and the OTR stage both go through the fused output layer; the
logits it recomputes chunk by chunk are bit-identical to the unfused ones on this CPU, so the job's
records agree to float32 rounding of the weight-gradient accumulation order.
"""

import pytest

from tests.train.test_train_e2e import _run, _train


@pytest.mark.slow
def test_fused_output_layer_gives_the_unfused_job(tmp_path):
    plain = _run(tmp_path / "plain")
    fused = _run(tmp_path / "fused", "otr.fuse_output_layer=true", "otr.fused_chunk_tokens=48")
    a, b = _train(plain), _train(fused)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in a:
        for x, y in zip(a[it], b[it]):  # (loss, hit rate or None in the CE stage, grad norm, label CE)
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-5, abs=1e-7), (it, a[it], b[it])
    evals = [(r, s) for r, s in zip(plain, fused) if r["kind"] == "eval"]
    assert evals and all(s["kind"] == "eval" for _, s in evals)
    for r, s in evals:
        for key, value in r.items():
            if isinstance(value, float) and "/" in key:
                assert s[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (r["iteration"], key)
