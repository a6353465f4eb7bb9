"""OTRMaskedTokenLossReduction inside NeMo's own MaskedTokenLossReduction (NeMo 2.x line only)."""

import pytest
import torch


@pytest.fixture
def reduction_cls(monkeypatch):
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2.x not installed (NEMO=2.7.3 line)")
    from megatron.core import parallel_state as ps

    from otr_megatron.nemo import load_adapter

    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(ps, "get_context_parallel_rank", lambda *a, **k: 0)
    return load_adapter().OTRMaskedTokenLossReduction


def _batch():
    from otr_megatron.nemo.step import STATS_KEY

    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float32)
    stats = {"label_logprob": torch.full((2, 4), -2.0), "hits": torch.ones(2, 4), "reward_mean": torch.zeros(2, 4)}
    return {"loss_mask": mask, "labels": mask.long(), STATS_KEY: {"stats": stats, "num_samples": 4}}


@pytest.mark.parametrize("normalization, expected", [("token", (2.0 + 1.0 + 3.0 + 5.0) / 4), ("sequence", (2.0 + 3.0) / 2)])
def test_otr_loss_report_is_what_nemo_backpropagates(reduction_cls, normalization, expected):
    """Rows with 1 and 3 supervised tokens: the token mean and the mean of the rows' own means."""
    losses = torch.tensor([[2.0, 9.0, 9.0, 9.0], [9.0, 1.0, 3.0, 5.0]])
    loss_sum, count, reduced = reduction_cls(normalization=normalization).forward(_batch(), losses)
    s, n = reduced["otr loss"].tolist()
    assert s / n == pytest.approx(expected)
    assert float(loss_sum) / float(count) == pytest.approx(expected)  # what NeMo backpropagates
    assert reduced["loss_sum_and_ub_size"].tolist() == pytest.approx([s, n])
    assert count.dtype == torch.int and int(count) == (4 if normalization == "token" else 2)
    lm_s, lm_n = reduced["lm loss"].tolist()
    assert (lm_s, lm_n) == (pytest.approx(8.0), 4.0)  # label cross entropy stays per token
