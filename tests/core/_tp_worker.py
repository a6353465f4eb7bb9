"""Worker for tests/core/test_tensor_parallel.py: runs in each of 4 gloo processes."""

import json
import os

import torch
import torch.distributed as dist

import otr_megatron as otr
from tests.core.reference import samples_matrix

N, VOCAB, K = 96, 1000, 64


class CommAudit:
    """Records every collective (name and element count) issued through torch.distributed."""

    NAMES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_to_all_single", "all_gather_object", "reduce", "gather", "scatter", "send", "recv"]

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES}
        for n, fn in self.saved.items():
            def wrapped(*args, _n=n, _fn=fn, **kw):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                sent = tensors[-1].numel() if tensors else -1  # the input (sent) tensor comes last
                self.calls.append((_n, sent))
                return _fn(*args, **kw)
            setattr(dist, n, wrapped)
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def full_inputs(dtype=torch.float32, padded=1024):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, padded, generator=g) * 3
    x[:, VOCAB:] = 30.0  # garbage in padded rows of the LM head
    y = torch.randint(0, VOCAB, (N,), generator=g)
    y[::7] = -100
    return x.to(dtype), y


def run(x, y, cfg, group=None, keys=None):
    xx = x.clone().requires_grad_()
    loss, st = otr.vocab_parallel_otr_loss(xx, y, cfg, tp_group=group, step=4, vocab_size=VOCAB, token_keys=keys,
                                           return_stats=True)
    loss.backward(torch.linspace(0.5, 2.0, N))  # per-token upstream gradient
    return loss.detach(), st, xx.grad


def check_layout(group, report):
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    x, y = full_inputs()
    shard = x.size(1) // tp
    keys = torch.arange(N) * 31 + 5
    for est in ["sample", "expected", "sft", "dft"]:
        cfg = otr.OTRConfig(estimator=est, num_samples=K, temperature=1.3, neg_reward=-0.1, chunk_tokens=13)
        loss1, st1, grad1 = run(x, y, cfg, keys=keys)
        part = x[:, r * shard : (r + 1) * shard]
        loss, st, grad = run(part, y, cfg, group, keys)
        if est == "sample":
            gathered = [None] * tp
            dist.all_gather_object(gathered, st["owned_samples"], group=group)
            ours = samples_matrix((torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])), N, K)
            ref = samples_matrix(st1["owned_samples"], N, K)
            report[f"tp{tp}_sample_mismatch"] = int((ours != ref).sum())
            assert torch.equal(ours, ref), f"TP={tp}: {int((ours != ref).sum())} samples differ from TP=1"  # layout-exact
            assert torch.equal(st["hits"], st1["hits"])
            torch.testing.assert_close(loss, loss1, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(grad, grad1[:, r * shard : (r + 1) * shard], atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(loss, loss1, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(grad, grad1[:, r * shard : (r + 1) * shard], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(st["label_logprob"], st1["label_logprob"], atol=2e-5, rtol=2e-5)
        # bf16 logits agree with fp32 to bf16 precision
        loss_bf16, _, grad_bf16 = run(part.bfloat16(), y, cfg, group, keys)
        if est != "sample":
            torch.testing.assert_close(loss_bf16, loss, atol=0.05, rtol=0.02)
            torch.testing.assert_close(grad_bf16.float(), grad, atol=0.02, rtol=0.05)

    # communication audit: O(tp) numbers per token, independent of K; <= 3 collectives forward, 0 backward
    for est, extra in [("sample", 3), ("expected", 2), ("sft", 2)]:
        sizes = []
        for k in [8, 256]:
            cfg = otr.OTRConfig(estimator=est, num_samples=k)
            xx = x[:, r * shard : (r + 1) * shard].clone().requires_grad_()
            with CommAudit() as fwd:
                loss = otr.vocab_parallel_otr_loss(xx, y, cfg, tp_group=group, vocab_size=VOCAB)
            with CommAudit() as bwd:
                loss.sum().backward()
            assert len(fwd.calls) <= 3 and len(fwd.calls) == extra, fwd.calls
            assert bwd.calls == [], bwd.calls
            total = sum(n for _, n in fwd.calls)
            # each rank sends at most 6 numbers per token (+ a 7-number fingerprint) and receives tp x that
            assert total <= 6 * N + 7, (total, fwd.calls)
            sizes.append(fwd.calls)
        assert sizes[0] == sizes[1], f"communication grew with K: {sizes}"
        report[f"tp{tp}_{est}_collectives"] = sizes[0]

    # mismatched inputs across ranks fail loudly on every rank: a changed label, and changes that a
    # weighted sum sum((i+1) * label) cannot see ([10, 20] vs [12, 19]), permutations, swaps, shifts
    y0 = y.clone()
    y0[:2] = torch.tensor([10, 20])
    variants = {"changed": lambda t: torch.cat([((t[:4] + 1) % VOCAB), t[4:]]),
                "weighted-sum collision": lambda t: torch.cat([torch.tensor([12, 19]), t[2:]]),
                "permuted": lambda t: t[torch.randperm(N, generator=torch.Generator().manual_seed(3))],
                "swapped pair": lambda t: torch.cat([t[1:2], t[0:1], t[2:]]),
                "shifted": lambda t: torch.roll(t, 1)}
    for name, change in variants.items():
        bad_y = change(y0) if r == 0 else y0
        assert r != 0 or not torch.equal(bad_y, y0), name
        try:
            otr.vocab_parallel_otr_loss(x[:, :shard], bad_y, otr.OTRConfig(), tp_group=group, vocab_size=VOCAB)
            raise AssertionError(f"labels differing across TP ranks ({name}) were not detected")
        except ValueError as e:
            assert "disagree on labels" in str(e), (name, str(e))
    bad_keys = torch.arange(N) if r else torch.arange(N).flip(0)
    try:
        otr.vocab_parallel_otr_loss(x[:, :shard], y, otr.OTRConfig(), tp_group=group, vocab_size=VOCAB,
                                    token_keys=bad_keys)
        raise AssertionError("token keys differing across TP ranks were not detected")
    except ValueError as e:
        assert "disagree on token_keys" in str(e)
    rows = N if r else N - 1
    try:
        otr.vocab_parallel_otr_loss(x[:rows, :shard], y[:rows], otr.OTRConfig(), tp_group=group, vocab_size=VOCAB)
        raise AssertionError("different token counts across TP ranks were not detected")
    except ValueError as e:
        assert "disagree on number of tokens" in str(e)
    try:  # gathered (full-vocabulary) logits given to a vocab-parallel loss
        otr.vocab_parallel_otr_loss(x, y, otr.OTRConfig(), tp_group=group, padded_vocab_size=x.size(1))
        raise AssertionError("gathered logits were not detected")
    except ValueError as e:
        assert "padded_vocab_size" in str(e)


D = 24  # hidden size of the fused output-layer checks


def linear_inputs(dtype=torch.float32, padded=1024):
    g = torch.Generator().manual_seed(99)
    h = torch.randn(N // 4, 4, D, generator=g)  # [s, b, d]: s = 24 divides by every tp here
    w = torch.randn(padded, D, generator=g) * 0.6
    y = torch.randint(0, VOCAB, (N // 4, 4), generator=g)
    y[::5, 1] = -100
    return h.to(dtype), w.to(dtype), y


def run_linear(h, w, y, cfg, group=None, sp=False, keys=None):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, st = otr.vocab_parallel_linear_otr_loss(hh, ww, y, cfg, tp_group=group, sequence_parallel=sp, step=4,
                                                  vocab_size=VOCAB, token_keys=keys, return_stats=True)
    loss.backward(torch.linspace(0.5, 2.0, loss.numel()).view(loss.shape))
    return loss.detach(), st, hh.grad, ww.grad


def check_linear_layout(group, report):
    """The fused output layer + loss at TP=tp, with and without sequence parallelism, equals TP=1."""
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    h, w, y = linear_inputs()
    shard = w.size(0) // tp
    keys = (torch.arange(y.numel()) * 31 + 5).view(y.shape)
    seq = h.size(0) // tp
    for est in ["sample", "expected", "sft", "dft"]:
        cfg = otr.OTRConfig(estimator=est, num_samples=K, fused_chunk_tokens=10, chunk_tokens=4)
        loss1, st1, gh1, gw1 = run_linear(h, w, y, cfg, keys=keys)
        for sp in (False, True):
            h_in = h[r * seq : (r + 1) * seq] if sp else h
            loss, st, gh, gw = run_linear(h_in, w[r * shard : (r + 1) * shard], y, cfg, group, sp, keys)
            torch.testing.assert_close(loss, loss1, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(gw, gw1[r * shard : (r + 1) * shard], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gh, gh1[r * seq : (r + 1) * seq] if sp else gh1, atol=1e-5, rtol=1e-5)
            if est == "sample":
                gathered = [None] * tp
                dist.all_gather_object(gathered, st["owned_samples"], group=group)
                ours = samples_matrix((torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])),
                                      y.numel(), K)
                ref = samples_matrix(st1["owned_samples"], y.numel(), K)
                report[f"tp{tp}{'_sp' if sp else ''}_linear_sample_mismatch"] = int((ours != ref).sum())
                assert torch.equal(st["hits"], st1["hits"]), (tp, sp)
    # communication: the unfused path's per-token numbers (per chunk) forward; backward only the
    # output layer's own collective (all-reduce of the hidden gradient, or SP's all-gather + reduce-scatter)
    for sp in (False, True):
        cfg = otr.OTRConfig(num_samples=K, fused_chunk_tokens=48)
        h_in = (h[r * seq : (r + 1) * seq] if sp else h).clone().requires_grad_()
        with CommAudit() as fwd:
            loss = otr.vocab_parallel_linear_otr_loss(h_in, w[r * shard : (r + 1) * shard], y, cfg, tp_group=group,
                                                      sequence_parallel=sp, vocab_size=VOCAB)
        with CommAudit() as bwd:
            loss.sum().backward()
        names = [n for n, _ in fwd.calls]
        chunks = -(-y.numel() // 48)
        expect = ["all_gather_into_tensor"] * sp + ["all_gather_into_tensor"] + \
            ["all_gather_into_tensor", "all_reduce"] * chunks
        assert names == expect, (sp, fwd.calls)
        loss_numbers = sum(n for _, n in fwd.calls[1 + sp:])
        assert loss_numbers == 6 * y.numel(), fwd.calls  # 4 statistics + 2 partials per token
        expect_bwd = ["all_gather_into_tensor", "reduce_scatter_tensor"] if sp else ["all_reduce"]
        assert [n for n, _ in bwd.calls] == expect_bwd, bwd.calls
        report[f"tp{tp}{'_sp' if sp else ''}_linear_collectives"] = [fwd.calls, bwd.calls]


def main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    report = {}
    for tp in (4, 2):
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        check_layout(ps.get_tensor_model_parallel_group(), report)
        check_linear_layout(ps.get_tensor_model_parallel_group(), report)
        ps.destroy_model_parallel()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
