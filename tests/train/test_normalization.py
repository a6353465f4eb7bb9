"""`otr.normalization=sequence` in the train job (packed rows: each packed sample is a sequence).

Same seed, data and warm start: the CE stage is untouched, the first fine-tuning step draws the same
samples (equal hit rate) but weights them per sequence (different loss), and from then on training
differs. The exact weighting is checked by hand in tests/mcore/test_mcore_units.py.
"""

import pytest

from tests.train.test_train_e2e import _run, _train


@pytest.mark.slow
def test_sequence_normalization_changes_only_the_finetune_weighting(tmp_path):
    tok = _train(_run(tmp_path / "token", "otr.normalization=token"))
    seq = _train(_run(tmp_path / "seq", "otr.normalization=sequence"))
    assert sorted(tok) == sorted(seq) == [1, 2, 3, 4, 5, 6]
    for it in (1, 2, 3):  # CE warm start: token mean in both
        assert (tok[it][0], tok[it][2]) == pytest.approx((seq[it][0], seq[it][2]), rel=1e-6, abs=1e-9), it
    loss_t, hit_t, _, ce_t = tok[4]
    loss_s, hit_s, _, ce_s = seq[4]
    assert hit_s == pytest.approx(hit_t, rel=1e-6)  # same weights, same samples
    assert ce_s == pytest.approx(ce_t, rel=1e-6)  # "lm loss" stays the per-token label CE
    assert loss_s != pytest.approx(loss_t, rel=1e-4)  # per-sequence mean, not per-token mean
    assert (tok[6][0], tok[6][2]) != pytest.approx((seq[6][0], seq[6][2]), rel=1e-6)  # the gradient changed
