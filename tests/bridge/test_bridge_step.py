"""OTRForwardStep against Bridge's forward-step contract, on CPU.

A fast check on every megatron-core line: the wrapped step is a stand-in with the behaviour of
`gpt_step.forward_step` (next(batch) -> model(..., labels) -> masked-sum loss function); the model,
the OTR hook and the loss are real (megatron-core on gloo, TP=2). The real Bridge loop, its
get_batch and the equality oracle against the megatron-core path are in test_real_bridge.py.
"""

import inspect

import pytest

from otr_megatron import OTRConfig
from otr_megatron.bridge import OTRForwardStep


def test_signature_is_one_bridge_accepts():
    """Bridge injects GlobalState when the first parameter is named `state` (functors inspected via __call__)."""
    params = list(inspect.signature(OTRForwardStep(OTRConfig())).parameters.values())
    assert [p.name for p in params] == ["state", "data_iterator", "model", "return_schedule_plan"]
    assert params[3].default is False


@pytest.fixture(scope="module")
def contract():
    pytest.importorskip("megatron.core")
    from tests import harness as T

    from tests.bridge import bridge_workers as W

    return T.launch(W.step_contract_worker, 2)


@pytest.mark.slow
def test_loss_contract_and_metrics(contract):
    for r in contract:
        assert r["n"] == r["ref_n"] > 0
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6, abs=1e-6)
        assert set(r["report"]) == {"lm loss", "otr loss", "otr hit rate", "otr mean reward"}, r["report"]
        assert r["report"]["otr loss"] == pytest.approx([r["loss"], r["n"]], rel=1e-6)  # Bridge's own sum and count
        for key, pair in r["report"].items():
            assert len(pair) == 2, key  # [sum, count]: Bridge sums, all-reduces over DP x CP, divides
            assert pair == pytest.approx(r["ref_report"][key], rel=1e-6, abs=1e-6), key
        assert r["grad_finite"]
        assert r["errors"] and "return_schedule_plan" in r["errors"][0]


@pytest.mark.slow
def test_sequence_normalization_matches_mcore_path(contract):
    for r in contract:
        seq, ref = r["seq"], r["seq_ref"]
        assert seq["n"] == ref["n"] == 2  # two rows = two sequences, counted once
        assert seq["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6)
        assert seq["report"]["otr loss"] == pytest.approx([ref["loss"], 2.0], rel=1e-6, abs=1e-6)
        assert seq["report"]["otr loss"][0] != pytest.approx(r["report"]["otr loss"][0], rel=1e-3)
        # the label cross entropy stays per token: the same weights give the token run's value
        assert seq["report"]["lm loss"] == pytest.approx(r["report"]["lm loss"], rel=1e-6)
        for key, pair in ref["report"].items():
            assert seq["report"][key] == pytest.approx(pair, rel=1e-6, abs=1e-6), key
