"""Fixed host cost per call (issue 14): ATen ops dispatched per forward and per backward.

At V/tp = 16k (70B, TP=8) the kernels of one call take ~0.3-0.6 ms on a GPU and each op costs ~4-8 us
of host time, so the op count decides the call. Counted with a TorchDispatchMode on CPU. Under
TRITON_INTERPRET=1 the interpreter copies every tensor argument with ATen ops of its own; on a GPU a
launch is one driver call, so each launch counts as one op and what runs inside it is not counted.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

import otr_megatron as otr

ESTIMATORS = [("sample", 64), ("expected", 1), ("sft", 1), ("dft", 1)]
TRITON_FWD, TRITON_BWD = 40, 10  # issue 14's limits
# the torch path: regression bounds (measured 342 / 180 / 116 / 116 at N=64, V=4096; before issue 14: 403 / 238 /
# 173 / 173); most of "sample" is the torch sampler's own
TORCH_FWD = {"sample": 360, "expected": 190, "sft": 125, "dft": 125}
TORCH_BWD = 40  # was 46-54


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches_count_once(monkeypatch):
    """Each interpreted kernel launch: one op, its insides invisible to the counter."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        mode = _get_current_dispatch_mode()
        if isinstance(mode, OpCounter):
            mode.ops.append("triton::launch")
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", launch)


def count(backend, estimator, k, n=64, v=4096, step=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=g).bfloat16().requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    cfg = otr.OTRConfig(num_samples=k, estimator=estimator, seed=1, backend=backend)
    otr.vocab_parallel_otr_loss(x, y, cfg, step=step).sum().backward()  # warm-up: lazy imports, compiles
    otr.check_pending()
    x.grad = None
    with OpCounter() as fwd:
        loss = otr.vocab_parallel_otr_loss(x, y, cfg, step=step)
    total = loss.sum()
    with OpCounter() as bwd:
        total.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad.float()).all())
    return fwd.ops, bwd.ops


@pytest.mark.parametrize("estimator,k", ESTIMATORS)
@pytest.mark.parametrize("step", [1, "tensor"])
def test_triton_call_is_host_light(launches_count_once, estimator, k, step):
    fwd, bwd = count("triton", estimator, k, step=torch.tensor(1) if step == "tensor" else 1)
    launches = fwd.count("triton::launch")
    assert launches == (5 if estimator == "sample" else 3), fwd  # prologue, statistics, [normalise, sampler,] finish
    assert len(fwd) <= TRITON_FWD, (len(fwd), fwd)
    assert len(bwd) <= TRITON_BWD and bwd.count("triton::launch") == 1, (len(bwd), bwd)
    # no unused zero gradient is materialised for the statistics outputs
    assert not [o for o in bwd if "zero" in o or "fill" in o], bwd


@pytest.mark.parametrize("estimator,k", ESTIMATORS)
def test_torch_call_dispatches_fewer_ops(estimator, k):
    fwd, bwd = count("torch", estimator, k)
    assert len(fwd) <= TORCH_FWD[estimator], len(fwd)
    assert len(bwd) <= TORCH_BWD, len(bwd)
