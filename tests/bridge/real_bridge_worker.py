"""Real Megatron-Bridge runs for test_real_bridge.py: one gloo launch of 2 processes, CPU mode.

`bridge_runs(rank, world_size, workdir)` runs, in order, in the same processes (Bridge creates and
destroys its own Megatron state per run; the process group is the harness's):
1. a cross-entropy pretrain of `tiny_gpt_cpu_config` at TP=2 with Bridge's own `gpt_step`, saving
   a torch_dist checkpoint;
2. an OTR finetune from that checkpoint (`finetune`, `pretrained_checkpoint`) on SFT data through
   Bridge's own finetune dataset path (`GPTSFTDatasetConfig`: local JSONL, a local Hugging Face
   tokenizer), with `OTRConsoleMetrics`, the console captured;
3. the equality oracle at TP=2 and at TP=1 x DP=2: one Bridge iteration with OTR (lr 0, so the
   weights stay those of the forward), then the project's megatron-core path (`enable_otr` +
   `mcore.forward_step` + `get_forward_backward_func`) on the same model and micro-batches;
4. on rank 0, `otr-megatron bridge --hf-path` on a Llama recipe with a local config, and the
   offline error without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import dataclasses
import os
import sys

import torch

VOCAB = 256
SEQ = 64


def _tiny(tp: int, iters: int):
    from otr_megatron.bridge.recipes import tiny_gpt_cpu_config

    cfg = tiny_gpt_cpu_config()
    cfg.model.tensor_model_parallel_size = tp
    cfg.train.train_iters = iters
    cfg.rng.seed = 1234
    return cfg


def _checksum(model_chunks) -> float:
    """Sum of this rank's parameters in float64 (enough to tell loaded weights from a fresh init)."""
    return float(sum(p.detach().double().sum() for m in model_chunks for p in m.parameters()))


class _Record:
    """Bridge callback that keeps what the checks need from each run."""

    def __init__(self):
        self.losses, self.start_sum, self.end_sum, self.grads = [], None, None, None

    def on_train_start(self, ctx):
        self.start_sum = _checksum(ctx.model)

    def on_train_step_end(self, ctx):
        self.losses.append({k: float(v) for k, v in (ctx.loss_dict or {}).items()})
        self.grads = {n: p.main_grad.detach().clone() for n, p in ctx.model[0].named_parameters()}

    def on_train_end(self, ctx):
        self.end_sum = _checksum(ctx.model)
        self.model = ctx.model


def write_sft_data(root: str) -> str:
    """A local Hugging Face tokenizer (word level, 256 ids) and a prompt -> completion JSONL task."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"w{i}": len(special) + i for i in range(VOCAB - len(special))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = os.path.join(root, "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tok_dir)
    data = os.path.join(root, "sft")
    os.makedirs(data)
    gen = torch.Generator().manual_seed(0)
    with open(os.path.join(data, "training.jsonl"), "w") as f:
        for _ in range(64):  # completion = the prompt's words shifted by one id: learnable
            ids = torch.randint(0, 200, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen).tolist()
            f.write(json.dumps({"input": " ".join(f"w{i}" for i in ids),
                                "output": " ".join(f"w{i + 1}" for i in ids)}) + "\n")
    return tok_dir


def ce_pretrain(ckpt: str) -> dict:
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    cfg = _tiny(tp=2, iters=2)
    cfg.checkpoint.save = ckpt
    cfg.checkpoint.save_interval = 2
    rec = _Record()
    pretrain(cfg, forward_step, callbacks=[rec])
    return {"losses": rec.losses, "end_sum": rec.end_sum}


def otr_finetune(ckpt: str, tok_dir: str, data: str) -> dict:
    from megatron.bridge.data.builders.gpt_sft import GPTSFTDatasetConfig
    from megatron.bridge.training.finetune import finetune

    from otr_megatron import OTRConfig
    from otr_megatron.bridge.console import OTRConsoleMetrics
    from otr_megatron.bridge.step import OTRForwardStep

    cfg = _tiny(tp=2, iters=3)
    cfg.checkpoint.pretrained_checkpoint = ckpt
    cfg.tokenizer.tokenizer_type = "HuggingFaceTokenizer"
    cfg.tokenizer.tokenizer_model = tok_dir
    cfg.dataset = GPTSFTDatasetConfig(seq_length=SEQ, dataset_root=data, do_validation=False, do_test=False,
                                      num_workers=0, dataloader_type="batch", seed=1234)
    rec = _Record()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        finetune(cfg, OTRForwardStep(OTRConfig(num_samples=8, seed=7)), callbacks=[rec, OTRConsoleMetrics()])
    return {"losses": rec.losses, "start_sum": rec.start_sum, "console": out.getvalue()}


class _KeepBatches:
    """Data-iterator proxy: copies of the micro-batches Bridge's step consumed."""

    def __init__(self, inner, kept):
        self.inner, self.kept = inner, kept

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.kept.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch


def oracle(tp: int, fused: bool = False) -> dict:
    """Bridge's loop vs the project's megatron-core path on the same weights and micro-batches
    (``fused``: Bridge's with otr.fuse_output_layer=true, the megatron-core path's unfused)."""
    from megatron.bridge.training.pretrain import pretrain
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from otr_megatron import OTRConfig
    from otr_megatron.bridge.step import OTRForwardStep
    from otr_megatron.mcore import disable_otr, enable_otr, forward_step
    from otr_megatron.mcore.metrics import REPORT_NAMES, reduce_reports, report_means

    otr_cfg = OTRConfig(num_samples=16, seed=11)
    cfg = _tiny(tp=tp, iters=1)
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0  # both paths must be deterministic
    cfg.optimizer.lr = cfg.optimizer.min_lr = 0.0  # the step leaves the weights as the forward saw them
    cfg.optimizer.clip_grad = 0.0  # grads read after the step are the unclipped ones
    kept: list = []

    class Step(OTRForwardStep):
        def __call__(self, state, data_iterator, model, return_schedule_plan=False):
            return super().__call__(state, _KeepBatches(data_iterator, kept), model, return_schedule_plan)

    results = {}

    class Mcore(_Record):
        def on_train_end(self, ctx):
            """Still inside Bridge's run, where its parallel state and DDP model are alive."""
            super().on_train_end(ctx)
            model = ctx.model[0]
            bridge_grads = self.grads
            disable_otr(model)
            enable_otr(model, otr_cfg, vocab_size=VOCAB)  # a fresh hook, as the Bridge step made
            # as Bridge's train_step starts: the optimizer left param.grad aliasing main_grad, and
            # DDP's hook would add that alias to main_grad again
            ctx.optimizer.zero_grad()
            model.zero_grad_buffer()
            batches = [dict(b, step=0, attention_mask=None) for b in kept]  # Bridge's get_batch drops the mask
            reports = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=cfg.train.micro_batch_size,
                forward_only=False)
            mean = report_means(reduce_reports(reports, REPORT_NAMES, group=ps.get_data_parallel_group()))
            grads = {n: p.main_grad.detach() for n, p in model.named_parameters()}
            results.update(
                microbatches=len(batches),
                bridge=self.losses[0], mcore=mean,
                grad_max_abs_diff=max(float((grads[n] - g).abs().max()) for n, g in bridge_grads.items()),
                grad_max_abs=max(float(g.abs().max()) for g in bridge_grads.values()),
                weights_unchanged=self.start_sum == self.end_sum)

    step_cfg = dataclasses.replace(otr_cfg, fuse_output_layer=True, fused_chunk_tokens=24) if fused else otr_cfg
    pretrain(cfg, Step(step_cfg, vocab_size=VOCAB), callbacks=[Mcore()])
    return results


def hf_path_checks(root: str) -> dict:
    """A Llama recipe built from a local config directory, and the offline error without it."""
    from transformers import LlamaConfig

    from otr_megatron.bridge import cli

    hf_dir = os.path.join(root, "tiny-llama")
    LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=SEQ, architectures=["LlamaForCausalLM"]).save_pretrained(hf_dir)
    api = cli.BridgeAPI.default()
    recipe = "megatron.bridge.recipes.llama:llama32_1b_sft_config"
    cfg, _ = cli.build_config(cli.parse_args(["--recipe", recipe, "--hf-path", hf_dir]), api)
    os.environ["HF_HUB_OFFLINE"] = "1"  # no network attempts: the test machine may have none
    try:
        cli.build_config(cli.parse_args(["--recipe", recipe]), api)
        offline_error = None
    except cli.BridgeCLIError as exc:
        offline_error = str(exc)
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    return {"num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
            "tokenizer_model": cfg.tokenizer.tokenizer_model, "hf_dir": hf_dir, "offline_error": offline_error}


def bridge_runs(rank: int, world_size: int, workdir: str) -> dict:
    from otr_megatron.bridge import cpu

    cpu_line = cpu.enable_cpu_mode()
    tok_dir = os.path.join(workdir, "tokenizer")
    if rank == 0:
        write_sft_data(workdir)
    torch.distributed.barrier()
    ckpt = os.path.join(workdir, "ckpt")
    out = {"cpu_line": cpu_line}
    out["pretrain"] = ce_pretrain(ckpt)
    out["finetune"] = otr_finetune(ckpt, tok_dir, os.path.join(workdir, "sft"))
    out["oracle_tp2"] = oracle(tp=2)
    out["oracle_tp1_dp2"] = oracle(tp=1)
    out["oracle_tp2_fused"] = oracle(tp=2, fused=True)
    if rank == 0:
        out["hf"] = hf_path_checks(workdir)
    out["stub_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("transformer_engine", "nvidia_resiliency_ext"))
    torch.distributed.barrier()
    return out
