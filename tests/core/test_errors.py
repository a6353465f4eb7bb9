"""Bad input raises a clear error naming the argument; it never trains on wrong numbers."""

import math

import pytest
import torch

import otr_megatron as otr

X = torch.randn(4, 16)
Y = torch.tensor([1, 2, 3, -100])
CFG = otr.OTRConfig(num_samples=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.0), "num_samples"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(neg_reward=1.0), "neg_reward"),
        (dict(neg_reward=0.1), r"neg_reward \(beta\) must be a number in \[-1, 0\].*got 0.1"),
        (dict(neg_reward=-1.5), r"neg_reward.*\[-1, 0\].*got -1.5"),
        (dict(neg_reward=math.nan), "neg_reward"),
        (dict(neg_reward=-math.inf), "neg_reward"),
        (dict(neg_reward="-0.1"), "neg_reward"),
        (dict(temperature=math.nan), r"temperature \(kappa\) must be a finite number > 0.*got nan"),
        (dict(backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"),
        (dict(estimator="ppo"), "estimator"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        otr.OTRConfig(**kwargs)


@pytest.mark.parametrize("beta", [0, 0.0, -1, -1.0, -0.1])
def test_config_accepts_the_documented_neg_reward_range(beta):
    assert otr.OTRConfig(neg_reward=beta).neg_reward == beta


def test_triton_backend_request_fails_clearly_when_unavailable(monkeypatch):
    import sys

    from otr_megatron.core.backends import get_backend

    monkeypatch.setitem(sys.modules, "otr_megatron.core.triton_backend", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match="backend='triton'.*does not import"):
        get_backend("triton", torch.device("cpu"))
    assert get_backend("auto", torch.device("cuda")).name == "torch"  # auto falls back
    assert get_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(RuntimeError, match="backend='triton'"):
        otr.vocab_parallel_otr_loss(X, Y, otr.OTRConfig(num_samples=4, backend="triton"))


def _combines():
    from otr_megatron.core import torch_combine, triton_combine

    return [torch_combine, triton_combine]


def _prints(combine, labels, keys, step=0, vocab=1000):
    from otr_megatron.core.loss import make_spec

    spec = make_spec(CFG, 0, 1, vocab, vocab)
    return combine.prologue(labels, keys, step, spec, -100, vocab, 77, True).prints


def test_fingerprint_tells_apart_label_sequences_a_weighted_sum_confuses():
    """Simulated all-gather of two ranks' fingerprints: any difference raises, on every rank; the
    torch and Triton prologues compute the same numbers."""
    from otr_megatron.core.checks import problem

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 1000, (64,), generator=g)
    base[:2] = torch.tensor([10, 20])
    keys = torch.arange(64)
    swapped = base.clone()
    swapped[[5, 9]] = base[[9, 5]]
    variants = {
        "weighted-sum collision": torch.cat([torch.tensor([12, 19]), base[2:]]),  # 10+2*20 == 12+2*19
        "permuted": base[torch.randperm(64, generator=g)],
        "swapped pair": swapped,
        "shifted": torch.roll(base, 1),
        "one changed": torch.where(torch.arange(64) == 30, base + 1, base),
    }
    torch_c, triton_c = _combines()
    for combine in (torch_c, triton_c):
        def rows(*prints):
            return torch.stack(prints).tolist()

        ok = _prints(combine, base, keys, step=9)
        assert torch.equal(ok, _prints(torch_c, base, keys, step=9)), "the backends' fingerprints differ"
        assert problem(rows(ok, ok), 1000, -100) is None  # equal: passes
        for name, other in variants.items():
            assert not torch.equal(other, base), name
            for gathered in ([ok, _prints(combine, other, keys, 9)], [_prints(combine, other, keys, 9), ok]):
                msg = problem(rows(*gathered), 1000, -100)
                assert msg and "disagree on labels" in msg and msg.startswith("vocab_parallel_otr_loss at step 9"), msg
        msg = problem(rows(ok, _prints(combine, base, keys.flip(0), 9)), 1000, -100)
        assert "disagree on token_keys" in msg
        msg = problem(rows(ok, _prints(combine, base, keys, 10)), 1000, -100)
        assert "disagree on step (per rank: [9, 10])" in msg


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fingerprint_reports_out_of_range_labels_without_a_host_read(backend):
    from otr_megatron.core import torch_combine, triton_combine
    from otr_megatron.core.checks import problem

    combine = torch_combine if backend == "torch" else triton_combine
    labels = torch.tensor([5, -100, 1003, 7, -2, 1000, 3])
    p = _prints(combine, labels, torch.arange(7), step=torch.tensor(4), vocab=1000)
    msg = problem(p[None].tolist(), 1000, -100)
    assert msg == ("vocab_parallel_otr_loss at step 4: labels must be token ids in [0, vocab_size=1000) or "
                   "ignore_index=-100; found 3 outside (smallest -2, largest 1003, first at flat position 2)"), msg


@pytest.mark.parametrize("step", [2**64 + 5, 2**63, -1, 1.0, True, "3"])
def test_python_step_outside_int64_is_rejected(step):
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, 2\*\*63\).*got " + repr(step).replace("(", r"\(")):
        otr.vocab_parallel_otr_loss(X, Y, CFG, step=step)


@pytest.mark.parametrize("step", [torch.tensor([3]), torch.tensor(3, dtype=torch.int32), torch.tensor(3.0)])
def test_tensor_step_must_be_a_0_dim_int64_tensor_on_the_logits_device(step):
    with pytest.raises(ValueError, match="step as a tensor must be a 0-dim int64 tensor on the logits' device cpu"):
        otr.vocab_parallel_otr_loss(X, Y, CFG, step=step)


def test_check_inputs_setting_is_validated():
    with pytest.raises(ValueError, match=r"check_inputs must be one of \('deferred', 'eager', 'off'\), got 'lazy'"):
        otr.OTRConfig(check_inputs="lazy")
    assert otr.OTRConfig().check_inputs == "deferred"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ["sample", "expected", "sft", "dft"])
def test_deferred_check_raises_at_the_next_call_or_check_pending_naming_the_step(monkeypatch, backend, estimator):
    """What a CUDA run does (on CPU the check is read at the end of the call itself): a bad label
    raises at the next call, or at check_pending(), with the step of the call it came from."""
    from otr_megatron.core import checks

    otr.check_pending()
    monkeypatch.setattr(checks, "_reads_now", lambda device: False)
    cfg = otr.OTRConfig(num_samples=4, estimator=estimator, backend=backend)
    bad = torch.tensor([1, 2, 16, 0])
    loss = otr.vocab_parallel_otr_loss(X, bad, cfg, step=torch.tensor(41))  # no raise: nothing was read
    assert loss.shape == (4,) and checks.pending_count() == 1
    with pytest.raises(ValueError, match=r"at step 41: labels must be token ids in \[0, vocab_size=16\).*found 1 "
                                         r"outside \(largest 16, first at flat position 2\)"):
        otr.vocab_parallel_otr_loss(X, Y, cfg, step=42)  # the next call
    assert checks.pending_count() == 0
    otr.vocab_parallel_otr_loss(X, bad, cfg, step=43)
    with pytest.raises(ValueError, match="at step 43: labels must be"):
        otr.check_pending()
    otr.check_pending()  # raised once: nothing left


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deferred_check_on_cpu_raises_in_the_call_and_eager_gives_examples(backend):
    bad = torch.tensor([1, 2, 16, -3])
    with pytest.raises(ValueError, match=r"at step 7: .*found 2 outside \(smallest -3, largest 16, first at flat"):
        otr.vocab_parallel_otr_loss(X, bad, otr.OTRConfig(num_samples=4, backend=backend), step=torch.tensor(7))
    with pytest.raises(ValueError, match=r"at step 8: .*found 2 outside \(e\.g\. \[16, -3\]\)"):
        otr.vocab_parallel_otr_loss(X, bad, otr.OTRConfig(num_samples=4, backend=backend, check_inputs="eager"), step=8)
    with pytest.raises(ValueError, match=r"at step -2: step must be an integer >= 0"):
        otr.vocab_parallel_otr_loss(X, Y, otr.OTRConfig(num_samples=4, backend=backend), step=torch.tensor(-2))


def test_a_raised_deferred_check_empties_the_queue(monkeypatch):
    """Two bad calls pending: the first raises, the second is dropped with it, so a caught error never
    resurfaces inside a later, unrelated call."""
    from otr_megatron.core import checks

    otr.check_pending()
    monkeypatch.setattr(checks, "_reads_now", lambda device: False)
    monkeypatch.setattr(checks._Record, "ready", lambda self: False)  # copies still in flight (as on a GPU)
    bad = torch.tensor([1, 2, 16, 0])
    for step in (3, 4):
        otr.vocab_parallel_otr_loss(X, bad, CFG, step=step)
    assert checks.pending_count() == 2
    with pytest.raises(ValueError, match="at step 3: labels must be"):
        otr.check_pending()
    assert checks.pending_count() == 0
    otr.vocab_parallel_otr_loss(X, Y, CFG, step=5)
    otr.check_pending()


def test_unchecked_deferred_errors_are_reported_at_exit(tmp_path):
    """A loop that ends without a last check_pending() still reports its calls' input errors (stderr)."""
    import subprocess
    import sys

    script = (
        "import torch, otr_megatron as otr\n"
        "from otr_megatron.core import checks\n"
        "checks._reads_now = lambda device: False\n"
        "otr.vocab_parallel_otr_loss(torch.randn(4, 16), torch.tensor([1, 2, 16, 0]), "
        "otr.OTRConfig(num_samples=4, backend='torch'), step=9)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "otr_megatron: a deferred input check failed after the last check_pending(): " in r.stderr, r.stderr
    assert "at step 9: labels must be token ids" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ["sample", "expected", "sft", "dft"])
@pytest.mark.parametrize("check_inputs", ["deferred", "eager", "off"])
def test_a_call_with_no_tokens_returns_empty_loss_and_gradient(backend, estimator, check_inputs):
    cfg = otr.OTRConfig(num_samples=4, estimator=estimator, backend=backend, check_inputs=check_inputs)
    x = torch.randn(0, 16, requires_grad=True)
    loss = otr.vocab_parallel_otr_loss(x, torch.zeros(0, dtype=torch.long), cfg)
    loss.sum().backward()
    assert loss.shape == (0,) and x.grad.shape == (0, 16)
    loss, stats = otr.vocab_parallel_otr_loss(torch.randn(2, 0, 16), torch.zeros(2, 0, dtype=torch.long), cfg,
                                              return_stats=True)
    assert loss.shape == (2, 0) and stats["valid"].shape == (2, 0)


def test_check_inputs_off_sends_no_fingerprint():
    from otr_megatron.core import checks, torch_combine

    otr.check_pending()
    calls = []
    real = torch_combine.prologue

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    torch_combine.prologue, saved = spy, real
    try:
        loss = otr.vocab_parallel_otr_loss(X, Y, otr.OTRConfig(num_samples=4, backend="torch", check_inputs="off"))
    finally:
        torch_combine.prologue = saved
    assert calls == [False] and checks.pending_count() == 0 and loss.shape == (4,)


def test_config_from_dict_names_unknown_keys():
    from otr_megatron.core.config import UnknownOTRKeyError

    with pytest.raises(UnknownOTRKeyError) as info:
        otr.OTRConfig.from_dict({"num_sample": 3, "temperature": 1.0, "kappa": "x"})
    msg = str(info.value)
    assert msg.startswith("unknown OTR settings otr.num_sample=3, otr.kappa='x'; known: otr.num_samples, ")
    assert "otr.temperature" in msg.split("known:")[1] and isinstance(info.value, ValueError)
    assert info.value.unknown == {"num_sample": 3, "kappa": "x"}
    cfg = otr.OTRConfig.from_dict({"num_samples": 3, "temperature": 2})
    assert cfg.num_samples == 3 and cfg.temperature == 2.0 and type(cfg.temperature) is float
    with pytest.raises(ValueError, match=r"OTRConfig\.neg_reward .*got 0\.5"):  # values: __post_init__'s rules
        otr.OTRConfig.from_dict({"neg_reward": 0.5})


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, 16, 0]), CFG), ValueError, r"labels.*\[0, vocab_size=16\)"),
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, -1, 0]), CFG), ValueError, "ignore_index=-100"),
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, 12, 0]), CFG, vocab_size=10), ValueError, "vocab_size=10"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y[:3], CFG), ValueError, "labels shape"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y.float(), CFG), TypeError, "labels must be an int64"),
        (lambda: otr.vocab_parallel_otr_loss(X.long(), Y, CFG), TypeError, "logits must be"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, vocab_size=17), ValueError, "vocab_size"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, vocab_size=0), ValueError, "vocab_size"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, padded_vocab_size=32), ValueError, "padded_vocab_size=32"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, token_keys=torch.arange(3)), ValueError, "token_keys shape"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, token_keys=torch.ones(4)), TypeError, "token_keys"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, step=-1), ValueError, "step"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, {"num_samples": 4}), TypeError, "OTRConfig"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, ignore_index=1), ValueError, "ignore_index=1"),
    ],
)
def test_loss_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_in_place_change_of_logits_before_backward_is_detected():
    x = X.clone().requires_grad_()
    logits = x * 1.0
    loss = otr.vocab_parallel_otr_loss(logits, Y, CFG)
    logits.add_(1.0)  # someone modifies the saved logits
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
