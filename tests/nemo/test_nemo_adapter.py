"""NeMo 2.0 adapter on CPU: version messages, token keys under CP, the forward-step contract, recipes.

nemo-toolkit (<= 2.7, with nemo.collections.llm) cannot be installed here: the forward step runs
against a stand-in NeMo model wrapping a real megatron-core GPTModel; the recipe helper runs with
NeMo-Run/fiddle (skipped without them) and a stand-in model class. `OTRGPTModel` /
`OTRMaskedTokenLossReduction` themselves (adapter.py) are only import-checked where NeMo exists.
"""

import dataclasses

import pytest
import torch

from otr_megatron import OTRConfig
from otr_megatron.nemo import NeMoVersionError, check_nemo_version, load_adapter
from otr_megatron.nemo.step import nemo_token_keys, reduce_otr_metrics


def test_nemo3_points_to_bridge():
    with pytest.raises(NeMoVersionError) as exc:
        check_nemo_version("3.0.0", has_llm=False)
    msg = str(exc.value)
    assert "no LLM collections" in msg and "otr-megatron bridge" in msg


@pytest.mark.parametrize("version,has_llm,needle", [
    ("2.7.3", False, "without nemo.collections.llm"),
    ("1.23.0", True, "NeMo 2.0 API"),
])
def test_other_versions(version, has_llm, needle):
    with pytest.raises(NeMoVersionError, match=needle):
        check_nemo_version(version, has_llm=has_llm)


def test_supported_version():
    assert check_nemo_version("2.7.3", has_llm=True) == "2.7.3"


def test_load_adapter_without_nemo_is_clear(monkeypatch):
    import otr_megatron.nemo.compat as compat

    monkeypatch.setattr(compat, "installed_nemo_version", lambda: None)
    with pytest.raises(NeMoVersionError, match="nemo-toolkit is not installed"):
        load_adapter()
    monkeypatch.setattr(compat, "installed_nemo_version", lambda: "3.0.0")
    with pytest.raises(NeMoVersionError, match="Megatron-Bridge"):
        load_adapter()


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_token_keys_follow_megatron_zigzag(cp):
    """Keys built after NeMo's CP split equal the full batch's keys (`mcore.keys.token_keys`), sliced,
    for per-row ids, per-token ids with their position_ids, and the fallback ids."""
    from otr_megatron.mcore.keys import token_keys
    from otr_megatron.mcore.training import slice_batch_for_cp

    b, s = 2, 16
    sid = torch.tensor([7, 9])
    per_token = torch.tensor([[3] * 10 + [4] * 6, [5] * 16])
    pos = torch.cat([torch.arange(10), torch.arange(6)])[None].expand(b, s).contiguous()
    pos[1] = torch.arange(s)
    full = {"labels": torch.zeros(b, s, dtype=torch.long), "rows": token_keys(sid, s),
            "packed": token_keys(per_token, s, pos), "sample_ids": per_token, "position_ids": pos}
    for r in range(cp):
        local = slice_batch_for_cp(full, cp, r)
        got = nemo_token_keys({"labels": local["labels"], "sample_ids": sid}, cp_size=cp, cp_rank=r, fallback_ids=None)
        assert torch.equal(got, local["rows"])
        got = nemo_token_keys({"labels": local["labels"], "sample_ids": local["sample_ids"],
                               "position_ids": local["position_ids"]}, cp_size=cp, cp_rank=r, fallback_ids=None)
        assert torch.equal(got, local["packed"])
        got = nemo_token_keys({"labels": local["labels"]}, cp_size=cp, cp_rank=r, fallback_ids=sid)
        assert torch.equal(got, local["rows"])


def test_reduce_metrics_is_per_token_mean():
    mbs = [{"otr hit rate": torch.tensor([2.0, 4.0]), "loss_sum_and_ub_size": torch.tensor([1.0, 4.0])},
           {"otr hit rate": torch.tensor([1.0, 6.0])}]
    assert reduce_otr_metrics(mbs) == {"otr hit rate": pytest.approx(0.3)}


@pytest.mark.slow
def test_forward_step_matches_mcore_integration():
    pytest.importorskip("megatron.core")
    from tests import harness as T

    from tests.nemo import nemo_workers as W

    (r,) = T.launch(W.nemo_step_worker, 1)
    assert r["has_stats"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    for k, v in r["report"].items():
        assert v == pytest.approx(r["ref_report"][k], rel=1e-6)
    assert r["report"]


class FakeLlamaModel:
    def __init__(self, config=None, optim=None, tokenizer=None, model_transform=None):
        self.config = config


class FakeOTRModel(FakeLlamaModel):
    def __init__(self, config=None, optim=None, tokenizer=None, model_transform=None, model_context_managers=None,
                 otr=None, vocab_size=None):
        super().__init__(config, optim, tokenizer, model_transform)
        self.otr, self.vocab_size = otr, vocab_size


@dataclasses.dataclass
class FakeLlamaConfig:
    num_layers: int = 80


def fake_finetune(model=None, trainer=None):
    return model


def test_otr_recipe_swaps_model_keeps_config():
    run = pytest.importorskip("nemo_run", reason="nemo_run not installed (pip install nemo-run 'leptonai==0.27.3')")
    import fiddle as fdl

    from otr_megatron.nemo import otr_recipe

    recipe = run.Partial(fake_finetune, model=run.Config(FakeLlamaModel, config=run.Config(FakeLlamaConfig, num_layers=80)))
    out = otr_recipe(recipe, num_samples=64, temperature=1.2, model_cls=FakeOTRModel, vocab_size=128256)
    assert out is recipe and recipe.model.__fn_or_cls__ is FakeOTRModel
    built = fdl.build(recipe)()
    assert isinstance(built, FakeOTRModel) and built.config.num_layers == 80 and built.vocab_size == 128256
    assert built.otr == OTRConfig(num_samples=64, temperature=1.2)
    with pytest.raises(ValueError, match="unknown OTR setting otr.bogus=1; known: otr.num_samples"):
        otr_recipe(run.Partial(fake_finetune, model=run.Config(FakeLlamaModel)), bogus=1, model_cls=FakeOTRModel)
    with pytest.raises(TypeError, match="run.Config\\(GPTModel"):
        otr_recipe(run.Partial(fake_finetune), model_cls=FakeOTRModel)


def test_sequence_normalized_batch_turns_token_means_into_sequence_means():
    """NeMo's MaskedTokenLossReduction computes sum(loss * loss_mask) / sum(loss_mask) per micro-batch
    (with CP: / num_valid_tokens_in_ub); with the re-weighted batch that is the mean of the rows'
    own means. Hand case: rows with 1 and 3 supervised tokens."""
    from otr_megatron.nemo.step import sequence_normalized_batch

    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float32)
    losses = torch.tensor([[2.0, 9.0, 9.0, 9.0], [9.0, 1.0, 3.0, 5.0]])
    out = sequence_normalized_batch({"loss_mask": mask, "labels": mask.long()})
    nemo_mean = float((losses * out["loss_mask"]).sum() / out["loss_mask"].sum())
    assert nemo_mean == pytest.approx((2.0 + 3.0) / 2)
    assert float(out["num_valid_tokens_in_ub"]) == 2.0
    assert torch.equal(mask, torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float32))  # input untouched
    with pytest.raises(NotImplementedError, match="packed"):
        sequence_normalized_batch({"loss_mask": mask, "cu_seqlens": torch.tensor([[0, 4]])})
