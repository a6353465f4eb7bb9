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


def test_fingerprint_tells_apart_label_sequences_a_weighted_sum_confuses():
    """Simulated all-gather of two ranks' fingerprints: any difference raises, on every rank."""
    from otr_megatron.core.loss import _fingerprint, _verify_fingerprints

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

    def prints(labels, k=keys):
        return _fingerprint(labels, k, 1000, -100, CFG, 0, 16)

    _verify_fingerprints(torch.stack([prints(base), prints(base)]), base, 1000, -100)  # equal: passes
    for name, other in variants.items():
        assert not torch.equal(other, base), name
        for gathered in ([prints(base), prints(other)], [prints(other), prints(base)]):  # rank 0's and 1's view
            with pytest.raises(ValueError, match="disagree on labels"):
                _verify_fingerprints(torch.stack(gathered), base, 1000, -100)
    with pytest.raises(ValueError, match="disagree on token_keys"):
        _verify_fingerprints(torch.stack([prints(base), prints(base, keys.flip(0))]), base, 1000, -100)


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
