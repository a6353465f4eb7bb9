"""Per-rank body of the real NeMo 2.x test (module-level so spawn can import it).

NeMo's own loop (`llm.pretrain` through `otr_recipe(tiny_gpt_cpu_recipe())`, `MegatronStrategy` over
gloo) trains OTRGPTModel while a callback keeps, at every step, the weights the step ran with and
the gradients it produced, and the data step keeps the micro-batches. Then the project's
megatron-core path (`enable_otr` + `forward_step` under `get_forward_backward_func`) runs the same
step from the same weights on the same micro-batches; the worker returns both sides' numbers.
"""

from __future__ import annotations

import copy

import torch

BATCHES: list = []  # the micro-batches NeMo's data step produced, in order


def recording_data_step(dataloader_iter):
    """NeMo's `gpt_data_step`, keeping a copy of each micro-batch."""
    from nemo.collections.llm.gpt.model.base import gpt_data_step

    batch = gpt_data_step(dataloader_iter)
    BATCHES.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
    return batch


def _lightning_classes():
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import Logger

    class StepCapture(Callback):
        """At each optimizer step: the weights the step ran with, its gradients and OTR reports."""

        def __init__(self):
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            from otr_megatron.mcore import unwrap_model

            inner = unwrap_model(pl_module.module)
            self.steps.append({
                "step": int(trainer.global_step),
                "weights": {k: v.detach().clone() for k, v in inner.state_dict().items() if torch.is_tensor(v)},
                "grads": {n: p.main_grad.detach().clone() for n, p in inner.named_parameters()},
                "metrics": pl_module.otr_metrics(),
                "batches_seen": len(BATCHES),
            })

    class RecordingLogger(Logger):
        """What NeMo's loggers receive (TensorBoard gets the same dicts)."""

        def __init__(self):
            super().__init__()
            self.records = []

        @property
        def name(self):
            return "recording"

        @property
        def version(self):
            return "0"

        def log_metrics(self, metrics, step=None):
            self.records.append((step, {k: float(v) for k, v in metrics.items()}))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return StepCapture(), RecordingLogger()


def _mcore_step(ddp, forward_step, batches, step, n_mb, seq_length, mbs):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from otr_megatron.mcore.metrics import reduce_reports, report_means

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([dict(b, step=step) for b in batches]), model=[ddp],
        num_microbatches=n_mb, seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    return report_means(reduce_reports(losses, group=ps.get_data_parallel_group(with_context_parallel=True)))


def _hand_process_group_to_nemo() -> None:
    """MegatronStrategy initializes model parallelism only when it creates the process group itself:
    close the harness's group and point NeMo at a fresh rendezvous port (rank 0 picks it)."""
    import os

    from otr_megatron.distributed import free_port

    port = torch.tensor([free_port() if torch.distributed.get_rank() == 0 else 0])
    torch.distributed.broadcast(port, 0)
    torch.distributed.destroy_process_group()
    os.environ["MASTER_PORT"] = str(int(port))


def nemo_otr_worker(rank, world, tp, steps, workdir):
    """NeMo trains `steps` steps with OTR at TP=`tp`; the megatron-core path replays every step."""
    from otr_megatron.nemo.cpu import enable_cpu_mode

    patches = enable_cpu_mode()
    _hand_process_group_to_nemo()
    import fiddle as fdl
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from otr_megatron import OTRConfig
    from otr_megatron.mcore import enable_otr, forward_step, unwrap_model
    from otr_megatron.nemo import otr_recipe
    from otr_megatron.nemo.recipes import tiny_gpt_cpu_recipe
    from tests.harness import init_parallel

    otr = OTRConfig(num_samples=8, temperature=1.3, neg_reward=-0.1, seed=7)
    mbs, gbs, seq = 2, 4, 32
    recipe = otr_recipe(tiny_gpt_cpu_recipe(max_steps=steps, devices=world, tensor_model_parallel_size=tp,
                                            micro_batch_size=mbs, global_batch_size=gbs, seq_length=seq,
                                            lr=5e-3, log_dir=workdir), otr)
    recipe.model.config.data_step_fn = recording_data_step
    recipe.model.config.hidden_dropout = recipe.model.config.attention_dropout = 0.0  # same forward twice
    run_fn = fdl.build(recipe)
    capture, logger = _lightning_classes()
    run_fn.keywords["trainer"].callbacks.append(capture)
    run_fn.keywords["log"].extra_loggers = [logger]
    run_fn()
    model = run_fn.keywords["model"]
    trained = unwrap_model(model.module)
    final = {k: v.detach().clone() for k, v in trained.state_dict().items() if torch.is_tensor(v)}

    # The oracle: a fresh stock megatron-core GPTModel from the same config, outside NeMo's wrappers
    # (the copied config drops the sync hooks NeMo bound to its own DDP). NeMo's teardown destroyed
    # the model-parallel groups.
    init_parallel(tp)
    config = copy.copy(model.config)
    config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    mc = config.configure_model(model.tokenizer)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), mc)
    enable_otr(ddp, otr, vocab_size=model.tokenizer.vocab_size)
    dp = world // tp
    n_mb = gbs // (mbs * dp)
    out = {"patches": patches, "steps": [], "logged": logger.records,
           "weight_change": max(float((final[k] - capture.steps[0]["weights"][k]).abs().max()) for k in final)}
    seen = 0
    for rec in capture.steps:
        batches = BATCHES[seen:rec["batches_seen"]]
        seen = rec["batches_seen"]
        missing, unexpected = mc.load_state_dict(rec["weights"], strict=False)
        if [k for k in missing + unexpected if "_extra_state" not in k]:
            raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
        metrics = _mcore_step(ddp, forward_step, batches, rec["step"], n_mb, seq, mbs)
        grads = dict(mc.named_parameters())
        diffs = {n: float((grads[n].main_grad - g).abs().max()) for n, g in rec["grads"].items()}
        out["steps"].append({
            "step": rec["step"], "n_batches": len(batches), "nemo": rec["metrics"], "mcore": metrics,
            "grad_max_abs_diff": max(diffs.values()),
            "grad_max_abs": max(float(g.abs().max()) for g in rec["grads"].values()),
            "n_grads": len(diffs),
        })
    return out
