"""Fast single-process checks of the integration helpers (no process launch, no model)."""

import subprocess
import sys

import pytest
import torch

from otr_megatron.mcore.keys import batch_token_keys, cp_zigzag_positions, fallback_sample_ids, token_keys
from otr_megatron.mcore.training import loss_func, slice_batch_for_cp


def test_import_does_not_pull_megatron():
    code = "import sys, otr_megatron.mcore; assert 'megatron' not in sys.modules, 'megatron imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_positions_partition_the_sequence(cp):
    s = 32
    parts = [cp_zigzag_positions(s, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(s))
    c = s // (2 * cp)
    if cp == 2:  # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
        assert parts[0].tolist() == list(range(0, c)) + list(range(3 * c, 4 * c))
        assert parts[1].tolist() == list(range(c, 3 * c))


def test_zigzag_bad_args():
    with pytest.raises(ValueError, match="divisible by 2 \\* cp_size"):
        cp_zigzag_positions(30, 4, 0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        cp_zigzag_positions(16, 2, 2)


def test_token_keys_are_layout_invariant():
    """Keys of a token do not depend on DP split or CP slicing; no two tokens share a key."""
    b, s = 4, 16
    sid = torch.arange(b) + 100
    full = token_keys(sid, s)
    assert full[1, 3] == (101 + 1) * s + 3  # the formula
    assert full.unique().numel() == b * s
    for dp in (1, 2, 4):
        for r in range(dp):
            rows = slice(r * b // dp, (r + 1) * b // dp)
            mine = token_keys(sid[rows], s)
            assert torch.equal(mine, full[rows])
            for cp in (1, 2):
                got = [slice_batch_for_cp({"token_keys": mine}, cp, c)["token_keys"] for c in range(cp)]
                want = [mine[:, cp_zigzag_positions(s, cp, c)] for c in range(cp)]
                assert all(torch.equal(g, w) for g, w in zip(got, want))
                # built after the split from the global positions: the same keys
                assert all(torch.equal(token_keys(sid[rows], s, cp_zigzag_positions(s, cp, c)), w)
                           for c, w in enumerate(want))


def test_token_keys_per_token_ids_are_packing_invariant():
    """[b, s] ids (packed rows, -1 = padding) with restarting position_ids: a sample's tokens get the
    keys they have unpacked (one sample per row), and padding stays below every real key."""
    s = 8
    unpacked = token_keys(torch.tensor([5, 6]), s)  # two samples, one per row
    sid = torch.tensor([[5, 5, 5, 6, 6, -1, -1, -1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    packed = token_keys(sid, s, pos)
    assert packed[0, :3].tolist() == unpacked[0, :3].tolist() and packed[0, 3:5].tolist() == unpacked[1, :2].tolist()
    assert packed[0, 5:].tolist() == [0, 1, 2]
    batch = {"labels": torch.zeros(1, s, dtype=torch.long), "sample_ids": sid, "position_ids": pos}
    assert torch.equal(batch_token_keys(batch, seq_length=s), packed)
    cp_pos = cp_zigzag_positions(s, 2, 1)  # a CP rank's slice of the same row: positions travel with it
    local = {"labels": batch["labels"][:, cp_pos], "sample_ids": sid[:, cp_pos], "position_ids": pos[:, cp_pos]}
    assert torch.equal(batch_token_keys(local, seq_length=s, row_positions=cp_pos), packed[:, cp_pos])


def test_token_key_errors_name_the_argument():
    with pytest.raises(ValueError, match="sample_ids"):
        token_keys(torch.tensor([-2]), 8)
    with pytest.raises(ValueError, match="overflow"):
        token_keys(torch.tensor([2**61]), 8)
    with pytest.raises(ValueError, match="seq_length=0"):
        token_keys(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="positions"):
        token_keys(torch.tensor([0]), 8, torch.tensor([8]))
    with pytest.raises(ValueError, match="sample_ids"):
        token_keys(torch.tensor([0.5]), 8)
    with pytest.raises(ValueError, match="labels shape"):
        batch_token_keys({"labels": torch.zeros(1, 4), "sample_ids": torch.zeros(1, 3, dtype=torch.long)}, seq_length=4)


def test_fallback_ids_distinct_across_dp_and_microbatches():
    ids = torch.cat([fallback_sample_ids(2, dp_rank=r, dp_size=2, microbatch=m) for r in range(2) for m in range(3)])
    assert ids.unique().numel() == ids.numel()


def test_slice_batch_slices_attention_mask_on_dim2():
    b = {"tokens": torch.arange(16).view(1, 16), "attention_mask": torch.zeros(1, 1, 16, 16), "sample_ids": torch.tensor([3])}
    out = slice_batch_for_cp(b, 2, 1)
    assert out["tokens"].tolist() == [list(range(4, 12))]
    assert out["attention_mask"].shape == (1, 1, 8, 16)
    assert torch.equal(out["sample_ids"], b["sample_ids"])


def test_loss_func_contract():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # the NaN is masked out: must not leak
    stats = {"hits": torch.tensor([[9, 2, 0], [4, 9, 2]]), "label_logprob": -loss / 2,
             "reward_mean": torch.tensor([[5.0, -0.1, 0.2], [0.3, 5.0, -0.4]])}
    s, n, rep = loss_func(mask, loss, stats, num_samples=4)
    assert float(s) == 15.0 and int(n) == 4 and n.dtype == torch.int
    assert rep["otr loss"].tolist() == [15.0, 4.0]  # what is backpropagated
    assert rep["lm loss"].tolist() == [7.5, 4.0]  # the label cross entropy, -sum log p(label)
    assert rep["otr hit rate"].tolist() == [2.0, 4.0]  # (2 + 0 + 4 + 2) / 4 samples
    assert rep["otr mean reward"].tolist() == pytest.approx([0.0, 4.0])
    assert set(rep) == {"lm loss", "otr loss", "otr hit rate", "otr mean reward"}
    assert set(loss_func(mask, loss, stats)[2]) == {"lm loss", "otr loss", "otr mean reward"}  # no K: no hit rate
    # OTR off (plain cross entropy from the model): Megatron's own report
    _, _, plain = loss_func(mask, loss)
    assert {k: v.tolist() for k, v in plain.items()} == {"lm loss": [15.0, 4.0]}
    x = torch.ones(2, 3, requires_grad=True)
    s2, _, _ = loss_func(mask, x * 2)
    s2.backward()
    assert torch.equal(x.grad, 2 * mask)


def test_report_table_and_reduction():
    from otr_megatron.mcore.metrics import NEGATIVE_REPORTS, OTR_REPORTS, reduce_reports, report_means

    assert [r.name for r in OTR_REPORTS] == ["lm loss", "otr loss", "otr hit rate", "otr mean reward"]
    assert NEGATIVE_REPORTS == {"otr loss", "otr mean reward"}
    mbs = [{"lm loss": torch.tensor([3.0, 2.0]), "otr hit rate": torch.tensor([1.0, 2.0]), "other": torch.ones(2)},
           {"lm loss": torch.tensor([1.0, 2.0])}]
    totals = reduce_reports(mbs)
    assert totals["lm loss"] == (4.0, 4.0) and totals["otr loss"] == (0.0, 0.0) and "other" not in totals
    assert report_means(totals) == {"lm loss": 1.0, "otr hit rate": 0.5}
    assert reduce_reports(mbs, contribute=False)["lm loss"] == (0.0, 0.0)
    assert reduce_reports(mbs, names=["other"]) == {"other": (1.0, 1.0)}


def test_loss_func_rejects_non_finite():
    with pytest.raises(FloatingPointError, match="not finite"):
        loss_func(torch.ones(1, 2), torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="same \\[b, s\\] shape"):
        loss_func(torch.ones(1, 3), torch.ones(1, 2))


# ----------------------------------------------------------------------------------------------
# normalization="sequence": hand-computed weights and gradient
# ----------------------------------------------------------------------------------------------

def test_sequence_weights_rows_and_packed_segments():
    from otr_megatron.mcore.training import segment_ids_from_cu_seqlens, sequence_weights

    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.float32)
    w, starts = sequence_weights(mask)
    assert torch.allclose(w, torch.tensor([[0, .25, .25, .25, .25], [0, 0, 0, 1, 0]]))
    assert starts.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    # one packed row holding three samples (ids 7, 8, 9; -1 = padding), the middle one unsupervised
    seg = torch.tensor([[7, 7, 7, 8, 8, 9, 9, -1]])
    m = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.float32)
    w, starts = sequence_weights(m, seg)
    assert torch.allclose(w, torch.tensor([[0, .5, .5, 0, 0, 0, 1, 0]]))
    assert starts.tolist() == [[0, 1, 0, 0, 0, 0, 1, 0]]  # the unsupervised sample is not counted
    cu = torch.tensor([[0, 3, 5, 7, -1]])
    assert segment_ids_from_cu_seqlens(cu, 8).tolist() == [[0, 0, 0, 1, 1, 2, 2, 3]]
    with pytest.raises(ValueError, match="segment_ids"):
        sequence_weights(m, seg[:, :4])


def test_sequence_normalization_gradient_hand_computed():
    """Two sequences of 1 and 3 supervised tokens: token mean weights every token 1/4; sequence
    mean weights them 1/2 and 1/6 (each sequence's mean, then the mean over the 2 sequences)."""
    from otr_megatron.mcore.training import sequence_weights

    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float32)
    per_token = torch.tensor([[2.0, 9.0, 9.0, 9.0], [9.0, 1.0, 3.0, 5.0]], requires_grad=True)
    loss_sum, n, report = loss_func(mask, per_token)
    (loss_sum / n).backward()
    assert per_token.grad.tolist() == [[.25, 0, 0, 0], [0, .25, .25, .25]]
    assert float(loss_sum / n) == pytest.approx((2 + 1 + 3 + 5) / 4)

    per_token.grad = None
    w, starts = sequence_weights(mask)
    loss_sum, n, report = loss_func(mask, per_token, loss_weights=w, sequence_starts=starts)
    assert int(n) == 2 and n.dtype == torch.int32  # Megatron accumulates num_tokens in an int tensor
    (loss_sum / n).backward()
    assert torch.allclose(per_token.grad, torch.tensor([[.5, 0, 0, 0], [0, 1 / 6, 1 / 6, 1 / 6]]))
    assert float(loss_sum / n) == pytest.approx((2 / 1 + (1 + 3 + 5) / 3) / 2)
    assert report["lm loss"].tolist() == pytest.approx([float(loss_sum), 2.0])


def test_sequence_normalization_is_exact_under_cp_slicing():
    """Weights from the full micro-batch, then zigzag-sliced: the CP ranks' sums add up exactly."""
    from otr_megatron.mcore.training import sequence_weights

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 16, generator=g) > 0.3).float()
    losses = torch.rand(3, 16, generator=g)
    w, starts = sequence_weights(mask)
    full_sum, full_n, _ = loss_func(mask, losses, loss_weights=w, sequence_starts=starts)
    batch = {"m": mask, "l": losses, "w": w, "s": starts}
    parts = [slice_batch_for_cp(batch, 2, r) for r in range(2)]
    sums = [loss_func(p["m"], p["l"], loss_weights=p["w"], sequence_starts=p["s"]) for p in parts]
    assert sum(int(x[1]) for x in sums) == int(full_n) == 3
    assert sum(float(x[0]) for x in sums) == pytest.approx(float(full_sum), rel=1e-6)
    expected = sum(float((losses[i] * mask[i]).sum() / mask[i].sum()) for i in range(3))
    assert float(full_sum) == pytest.approx(expected, rel=1e-6)


def test_sequence_normalization_needs_per_token_loss_mode():
    from types import SimpleNamespace

    from otr_megatron.mcore.training import check_sequence_normalization

    class Model(torch.nn.Module):
        def __init__(self, per_token):
            super().__init__()
            self.config = SimpleNamespace(calculate_per_token_loss=per_token)

        def compute_language_model_loss(self, labels, logits):
            return logits

    check_sequence_normalization(Model(True))
    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        check_sequence_normalization(Model(False))


class _LM(torch.nn.Module):
    def compute_language_model_loss(self, labels, logits):
        return logits


class _ForwardingWrapper(torch.nn.Module):
    """Like NeMo's DDP / Float16Module: unknown attributes are looked up on `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def test_unwrap_model_decides_by_type_not_hasattr():
    from otr_megatron.mcore.hook import unwrap_model

    lm = _LM()
    wrapped = _ForwardingWrapper(_ForwardingWrapper(lm))
    assert hasattr(wrapped, "compute_language_model_loss")  # what fooled the hasattr version
    assert unwrap_model(wrapped) is lm and unwrap_model(lm) is lm
    with pytest.raises(TypeError, match="_ForwardingWrapper"):
        unwrap_model(_ForwardingWrapper(torch.nn.Linear(2, 2)))
    deep = lm
    for _ in range(3):
        deep = _ForwardingWrapper(deep)
    with pytest.raises(RuntimeError, match="more than 2 levels"):
        unwrap_model(deep, max_depth=2)
