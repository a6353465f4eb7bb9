"""No host synchronisation and no data-dependent shape by default (issue 14, docs/sampling.md section 6).

On CPU nothing blocks, so the ops that would block on CUDA are counted (or refused) instead, on the
same code path the GPU takes (neither backend has a device-specific branch): reading a value to the
host (`_local_scalar_dense`: .item(), bool(t), int(t)), data-dependent shapes (nonzero, masked_select,
boolean indexing, unique, ...), tensors built from host data (`lift_fresh`: torch.tensor(list), a
blocking host-to-device copy on CUDA), plus Tensor.tolist, which reads memory without dispatch. The
deferred input check reads its own host-side copy (`core/checks.py`, pinned memory on CUDA, read
once its event has passed): that is host memory, not a device sync, so it is not counted.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import otr_megatron as otr

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
           "masked_scatter", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh",
           "lift_fresh_copy", "repeat_interleave", "argwhere", "nonzero_static"}
ESTIMATORS = ["sample", "expected", "sft", "dft"]


class SyncCounter(TorchDispatchMode):
    """Records (or, with ``strict``, refuses) every op that would synchronise on CUDA."""

    def __init__(self, strict=False):
        super().__init__()
        self.ops, self.strict = [], strict

    def _seen(self, name):
        if self.strict:
            raise AssertionError(f"syncing op {name} in the default path")
        self.ops.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in SYNCING or bool_index:
            self._seen(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            if not getattr(t, "otr_host_copy", False):
                counter._seen("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def run(n, v, cfg, return_stats=False, vocab_size=None, step=0, strict=False):
    g = torch.Generator().manual_seed(n + v)
    x = (torch.randn(n, v, generator=g) * 2).bfloat16().requires_grad_()
    y = torch.randint(0, vocab_size or v, (n,), generator=g)
    y[::5] = -100
    upstream = torch.rand(n, generator=g)
    otr.check_pending()  # earlier tests' records: not this call's business
    with SyncCounter(strict) as counter:
        out = otr.vocab_parallel_otr_loss(x, y, cfg, vocab_size=vocab_size, return_stats=return_stats, step=step)
        loss = out[0] if return_stats else out
        loss.backward(upstream)
    return counter.ops, loss.detach(), x.grad


def test_the_counter_sees_what_it_should():
    with SyncCounter() as c:
        t = torch.arange(5)
        bool(t.any()), t[t > 2], t.nonzero(), t.tolist(), torch.tensor([1, 2])
    assert {"_local_scalar_dense", "index", "nonzero", "tolist", "lift_fresh"} <= set(c.ops), c.ops
    with pytest.raises(AssertionError, match="syncing op _local_scalar_dense"):
        with SyncCounter(strict=True):
            torch.arange(3).sum().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_no_host_sync_whatever_n_k_and_chunks(backend, estimator):
    """Deferred checks: 0 syncs; return_stats adds exactly the compaction of owned_samples (sample
    only); eager checks add exactly the blocking reads of the gathered and the local fingerprint."""
    cases = [(8, 64, 4, None, None), (50, 200, 16, 3, 190)]
    if backend == "torch":
        cases += [(97, 256, 64, 7, 250), (64, 512, 256, 1, None)]
    for n, v, k, chunk, vocab in cases:
        cfg = otr.OTRConfig(estimator=estimator, num_samples=k, chunk_tokens=chunk, backend=backend)
        assert run(n, v, cfg, vocab_size=vocab)[0] == []
        with_stats = run(n, v, cfg, True, vocab)[0]
        assert with_stats == (["nonzero"] if estimator == "sample" else []), with_stats
        eager = otr.OTRConfig(estimator=estimator, num_samples=k, chunk_tokens=chunk, backend=backend,
                              check_inputs="eager")
        assert run(n, v, eager, vocab_size=vocab)[0] == ["tolist", "tolist"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_tensor_step_forward_and_backward_run_under_a_mode_that_refuses_syncs(backend, estimator):
    """What CUDA-graph capture needs: a device-tensor step, and not one syncing op in forward +
    backward (the mode raises on the first); the same loss and gradient as the int step."""
    cfg = otr.OTRConfig(estimator=estimator, num_samples=16, backend=backend)
    _, loss_t, grad_t = run(24, 128, cfg, vocab_size=120, step=torch.tensor(2**40 + 3), strict=True)
    _, loss_i, grad_i = run(24, 128, cfg, vocab_size=120, step=2**40 + 3)
    assert torch.equal(loss_t, loss_i) and torch.equal(grad_t, grad_i)
    _, loss_other, _ = run(24, 128, cfg, vocab_size=120, step=2**40 + 4)
    if estimator == "sample":  # the step is part of the random key
        assert not torch.equal(loss_other, loss_i)
