"""No hot-path host synchronisation: a call (forward + backward) syncs at most twice whatever N, K or
the number of chunks (docs/sampling.md section 6).

On CPU nothing blocks, so the ops that would block on CUDA are counted instead, on the same code
path the GPU takes (the torch backend has no device-specific branch): reading a value to the host
(`_local_scalar_dense`: .item(), bool(t), int(t)), data-dependent shapes (nonzero, masked_select,
boolean indexing, unique, ...), tensors built from host data (`lift_fresh`: torch.tensor(list), a
blocking host-to-device copy on CUDA), plus Tensor.tolist, which reads memory without dispatch.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import otr_megatron as otr

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
           "masked_scatter", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh",
           "lift_fresh_copy", "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in SYNCING or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.ops.append("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def count_syncs(n, v, cfg, return_stats, vocab_size=None):
    g = torch.Generator().manual_seed(n + v)
    x = (torch.randn(n, v, generator=g) * 2).bfloat16().requires_grad_()
    y = torch.randint(0, vocab_size or v, (n,), generator=g)
    y[::5] = -100
    with SyncCounter() as counter:
        out = otr.vocab_parallel_otr_loss(x, y, cfg, vocab_size=vocab_size, return_stats=return_stats)
        loss = out[0] if return_stats else out
        loss.backward(torch.rand(n, generator=g))
    return counter.ops


def test_the_counter_sees_what_it_should():
    with SyncCounter() as c:
        t = torch.arange(5)
        bool(t.any()), t[t > 2], t.nonzero(), t.tolist(), torch.tensor([1, 2])
    assert {"_local_scalar_dense", "index", "nonzero", "tolist", "lift_fresh"} <= set(c.ops), c.ops


@pytest.mark.parametrize("estimator", ["sample", "expected", "sft", "dft"])
def test_at_most_two_host_syncs_whatever_n_k_and_chunks(estimator):
    counts = set()
    for n, v, k, chunk, vocab in [(8, 64, 4, None, None), (50, 200, 16, 3, 190), (97, 256, 64, 7, 250),
                                  (64, 512, 256, 1, None)]:
        cfg = otr.OTRConfig(estimator=estimator, num_samples=k, chunk_tokens=chunk)
        plain = count_syncs(n, v, cfg, False, vocab)
        with_stats = count_syncs(n, v, cfg, True, vocab)
        assert plain == ["tolist"], plain  # the fingerprint check only
        assert len(with_stats) <= 2, with_stats  # + compacting owned_samples (sample only)
        counts.add((tuple(plain), tuple(with_stats)))
    assert len(counts) == 1, f"the number of host syncs changed with N, K or chunks: {counts}"
