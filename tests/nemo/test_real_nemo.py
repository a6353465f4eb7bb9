"""The real NeMo 2.x loop (nemo-toolkit 2.7, megatron-core 0.15) on CPU, with OTR, against an oracle.

One 2-process gloo launch: NeMo's `llm.pretrain` trains `otr_recipe(tiny_gpt_cpu_recipe())` for 3
steps at TP=2 under `MegatronStrategy`, in the CPU mode (`otr_megatron.nemo.cpu`). Then, from the
weights each step ran with and on the micro-batches NeMo's data step produced, the project's
megatron-core path (`enable_otr` + `forward_step` under `get_forward_backward_func`) recomputes the
step: its losses, hit rate and every gradient shard must equal NeMo's. The loggers must receive
every OTR report under its name. Skipped without nemo.collections.llm (the megatron-core lines).
"""

import pytest

from otr_megatron.nemo import NeMoVersionError, check_nemo_version

STEPS = 3
REPORTS = ("lm loss", "otr loss", "otr hit rate", "otr mean reward")


def _nemo_missing():
    try:
        check_nemo_version()
    except NeMoVersionError as exc:
        return str(exc)
    return None


needs_nemo = pytest.mark.skipif(_nemo_missing() is not None, reason=f"NeMo 2.x LLM API not installed: {_nemo_missing()}")


def test_cpu_mode_is_a_no_op_with_a_gpu(monkeypatch):
    import torch

    from otr_megatron.nemo import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_APPLIED", [])
    assert cpu.enable_cpu_mode() == []


def test_with_one_cuda_device_is_scoped():
    import torch

    from otr_megatron.mcore.cpu_backend import with_one_cuda_device

    before = torch.cuda.device_count()
    assert with_one_cuda_device(lambda: torch.cuda.device_count())() == 1
    assert torch.cuda.device_count() == before


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    from tests import harness as T
    from tests.nemo import real_nemo_worker as W

    return T.launch(W.nemo_otr_worker, 2, 2, STEPS, str(tmp_path_factory.mktemp("nemo")))


@needs_nemo
@pytest.mark.slow
def test_cpu_mode_names_its_patches(tp2_run):
    for r in tp2_run:
        assert r["patches"] == [
            "otr_megatron.mcore.enable_cpu_mode",
            "nemo.lightning.megatron_init._set_random_seed(device_count=1)",
            "MockDataModule.setup(create_attention_mask=keyword)",
            "torch.tensor(pin_memory) in MegatronStrategy/MegatronDataSampler",
        ]


@needs_nemo
@pytest.mark.slow
def test_trains_and_equals_the_mcore_path(tp2_run):
    """Measured: every report and every gradient shard bit-identical (max abs diff 0.0)."""
    import math

    for rank, r in enumerate(tp2_run):
        assert [s["step"] for s in r["steps"]] == list(range(STEPS)), rank
        assert r["weight_change"] > 1e-4, f"rank {rank}: the weights did not change"
        for s in r["steps"]:
            nemo, mcore = s["nemo"], s["mcore"]
            assert set(nemo) == set(REPORTS) and set(mcore) == set(REPORTS), (rank, s)
            assert all(math.isfinite(v) for v in nemo.values()), (rank, s)
            for k in REPORTS:
                assert nemo[k] == pytest.approx(mcore[k], rel=1e-6, abs=1e-7), (rank, s["step"], k)
            assert s["n_grads"] > 0 and s["grad_max_abs"] > 0
            assert s["grad_max_abs_diff"] <= 1e-6 * s["grad_max_abs"], (rank, s["step"], s["grad_max_abs_diff"])
            # honest names: "lm loss" is the label cross entropy (about ln 256 for a fresh model), the
            # backpropagated OTR surrogate is "otr loss" (slightly negative with beta = -0.1)
            assert 0.9 * math.log(256) < nemo["lm loss"] < 1.1 * math.log(256)
            assert -1.0 < nemo["otr loss"] < 0.0
            assert 0.0 <= nemo["otr hit rate"] <= 1.0


@needs_nemo
@pytest.mark.slow
def test_logger_receives_every_otr_report(tp2_run):
    for rank, r in enumerate(tp2_run):
        logged = {int(step): m for step, m in r["logged"] if "otr loss" in m}
        assert sorted(logged) == list(range(STEPS)), (rank, r["logged"])
        for s in r["steps"]:
            m = logged[s["step"]]
            for k in REPORTS:
                assert m[k] == pytest.approx(s["nemo"][k], rel=1e-6), (rank, s["step"], k)
            # NeMo's own reduced_train_loss is the loss it backpropagates: the OTR surrogate
            assert m["reduced_train_loss"] == pytest.approx(m["otr loss"], rel=1e-6)
