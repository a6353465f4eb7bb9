"""Real multi-process gloo runs of megatron-core on CPU: OTR gives the same numbers in every layout.

One 4-process launch trains a tiny GPTModel for a few SGD steps in each layout (TP2+DP2, TP2+SP,
PP2 1F1B, TP2xPP2, interleaved PP2xVP2, CP2 simulated by zigzag slicing, full recompute) with
Megatron DDP + finalize_model_grads + get_forward_backward_func, and compares losses, logged
metrics and gradients (by global checkpoint key) with a single-model run on the same data/seed.
"""

import pytest

pytest.importorskip("megatron.core")

from tests import harness as T  # noqa: E402

from tests.mcore import mcore_workers as W  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layout_report():
    return T.launch(W.layouts_worker, 4, ("sample", "expected", "sample:sequence", "sample+fused"))


CASES = ([(est, lay) for est in ("sample", "expected", "sample+fused")
          for lay in list(W.LAYOUTS) + ["tp2_dp2_full_recompute"]]
         + [("sample:sequence", lay) for lay in W.SEQUENCE_LAYOUTS])


@pytest.mark.parametrize("estimator,layout", CASES)
def test_layout_matches_single_model(layout_report, estimator, layout):
    ref = layout_report[0][(estimator, "reference")]
    seen_loss = False
    for rank, rep in enumerate(layout_report):
        entry = rep[(estimator, layout)]
        assert entry["grad_rel_err"] < 1e-5, f"{layout}/{estimator} rank {rank}: gradient rel err {entry['grad_rel_err']}"
        if "loss" in entry:
            seen_loss = True
            for step, (a, b) in enumerate(zip(entry["loss"], ref["loss"])):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"{layout}/{estimator} rank {rank} step {step}"
            for step, (ma, mb) in enumerate(zip(entry["metrics"], ref["metrics"])):
                assert set(ma) == set(mb), (layout, ma, mb)
                for k in mb:
                    assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), f"{layout}/{estimator} {k} step {step}"
    assert seen_loss, f"{layout}: no last-stage rank reported a loss"
    if estimator == "sample:sequence":  # same samples, different weighting: hit rates equal, losses not
        tok = layout_report[0][("sample", "reference")]
        assert ref["metrics"][0]["otr hit rate"] == pytest.approx(tok["metrics"][0]["otr hit rate"], rel=1e-6)
        assert ref["loss"][0] != pytest.approx(tok["loss"][0], rel=1e-3)
    assert len(ref["loss"]) == W.STEPS
    if estimator == "sample":
        assert "otr hit rate" in ref["metrics"][0] and "otr mean reward" in ref["metrics"][0]


@pytest.fixture(scope="module")
def api_report():
    return T.launch(W.api_worker, 2)


def test_hook_contract_tp2(api_report):
    for rank, r in enumerate(api_report):
        assert r["unwrapped"] and r["state_dict_unchanged"], r
        assert r["real_vocab"] == 60
        assert r["no_context_error"], "forward without context must name set_otr_context"
        assert r["masked_tokens_zero"], "loss_mask==0 tokens must have exactly zero loss"
        assert {"hits", "label_logprob"} <= set(r["stats_keys"]), r["stats_keys"]
        assert r["stats_popped_once"]
        assert r["report_keys"] == ["lm loss", "otr hit rate", "otr loss", "otr mean reward"], r["report_keys"]
        assert r["lm_loss_is_label_ce"][0] == pytest.approx(r["lm_loss_is_label_ce"][1], rel=1e-5)
        assert r["otr_loss_is_backpropagated"]
        assert r["num_tokens"]
        assert r["repeatable"], "same context must give the same samples (activation recompute relies on it)"
        assert r["step_changes_samples"]
        assert r["stale_context_error"] and r["gathered_logits_error"]
        assert r["vocab_too_big_error"] and r["bad_keys_error"] and r["not_a_context_error"]
        from otr_megatron.mcore.hook import output_processor_supported

        want = True if output_processor_supported() else "unsupported"  # 0.18+ has the hook
        assert r["output_processor_equal"] == want
        assert r["disable_restores_ce"]


def test_mtp_heads_default_to_ce(api_report):
    r = api_report[0]
    assert r["mtp_ce_otr_calls"] == 1, "default: only the main head uses OTR"
    assert r["mtp_otr_otr_calls"] == 2, "mtp_loss='otr': main head and the MTP depth"
    assert len(r["mtp_otr_seeds"]) == 2, "the MTP depth must draw from its own random stream"


@pytest.fixture(scope="module")
def fused_report():
    return T.launch(W.fused_worker, 2)


@pytest.mark.parametrize("variant", ["plain", "sp", "tied", "tied_sp", "mtp_ce", "mtp_otr"])
def test_fused_output_layer_equals_unfused_tp2(fused_report, variant):
    """otr.fuse_output_layer=true: the same loss, samples and gradients (every parameter, the tied
    embedding's included) as the unfused hook, with SP, tied embeddings and MTP heads."""
    for rank, r in enumerate(fused_report):
        e = r[variant]
        assert e["loss_err"] < 1e-5 and e["hits_equal"], (variant, rank, e)
        assert e["grad_rel_err"] < 1e-5, (variant, rank, e)
        assert e["n_grads"] > 0


def test_fused_output_layer_routes_tp2(fused_report):
    from otr_megatron.mcore.hook import output_processor_supported

    for r in fused_report:
        assert r["tied_output_layer_has_no_weight"], "tied: the gradient must reach the shared embedding weight"
        assert r["no_labels_gives_logits"] and r["disable_restores_output_layer"] and r["loss_fn_refused"]
        if output_processor_supported():
            assert r["output_processor_fused_err"] < 1e-5
        else:
            assert r["output_processor_fused_err"] == "unsupported"
