"""The `otr-megatron train` loop: megatron-core GPTModel, DDP, Megatron optimizer and schedules.

One process per rank (world = tp x pp x dp); the launcher in `main.py` has already initialized
`torch.distributed`. The same code runs on CPU (gloo, `enable_cpu_mode`) and GPU (NCCL).

Stages: `pretrain_iters` steps of cross entropy give the tiny model a base distribution, then
`finetune_iters` steps with `cfg.loss`. Every loss, the pretraining CE included, goes through the
OTR hook (`enable_otr`), whose core loss implements sft/dft as estimators over the real vocabulary:
the A/B runs share every other line of code, and the padded ids (which depend on the TP size) never
enter a softmax, so the job gives the same numbers in any layout.

Randomness: model init is layout-invariant (`layout_invariant_init_`); the OTR stream is keyed on
(seed, iteration, global token key), the keys `prepare_batch` builds from the batch's per-token
`sample_ids` and `position_ids` (`mcore.keys.token_keys`): the same samples in any TP/PP/DP layout,
packed or not, and after a resume. Data position = iteration (each stage's
consumed_samples = steps_in_stage x global_batch_size), saved in the checkpoint and checked.
"""

from __future__ import annotations

import json
import math
import os
import time
from functools import partial

import torch

from otr_megatron.core.checks import check_pending
from otr_megatron.data import (
    GlobalBatchSampler,
    RecordKeys,
    build_sft_dataset,
    build_tokenizer,
    eval_microbatches,
    num_microbatches,
    split_global_batch,
)
from otr_megatron.mcore.metrics import REPORT_NAMES, reduce_reports, report_means
from otr_megatron.train.config import TrainConfig, dump_yaml, resolve_path
from otr_megatron.train.errors import DivergenceError, RunDirError

EVAL_REPORTS = ("ce", "token_acc", "exact_match")  # `_eval_loss`'s [sum, count] reports


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


class Trainer:
    """Builds everything from a `TrainConfig` and runs (or resumes) the job."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = cfg.output_dir
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.iteration = 0
        self.loss_mode = None  # the loss currently installed on the model
        self.last_checkpoint: tuple[str, int] | None = None  # (path, iteration) of the newest good one
        self._params_ok_at = -1  # iteration whose parameters `check_params` last found finite

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp)
        torch.default_generator.manual_seed(cfg.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.tp_rank = ps.get_tensor_model_parallel_rank()

        self._build_data()
        self._build_model()
        self._build_optimizer()

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        try:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except ImportError:
            pass
        self.tokenizer = build_tokenizer(d.tokenizer if d.tokenizer == "byte" else resolve_path(d.tokenizer))
        keys = RecordKeys(d.prompt_key, d.response_key, d.messages_key)
        common = dict(
            pack=d.pack,
            packed_attention_mask=d.packed_attention_mask,
            on_overflow=d.on_overflow,
            seed=cfg.seed,
            keys=keys,
            cache_dir=d.cache_dir,
            verbose=_rank0(),
        )

        def build(name, paths):
            ds = build_sft_dataset([resolve_path(p) for p in paths], self.tokenizer, d.seq_length, name=name, **common)
            _log("data  " + ds.stats.summary(name))
            return ds

        self.pretrain_data = build("pretrain", d.pretrain) if cfg.pretrain_iters > 0 else None
        self.train_data = build("train", d.train) if cfg.finetune_iters > 0 else None
        self.eval_data = {name: build(f"eval/{name}", paths) for name, paths in d.eval.items()}
        self.samplers = {}
        for stage, ds in (("pretrain", self.pretrain_data), ("finetune", self.train_data)):
            if ds is not None:
                self.samplers[stage] = GlobalBatchSampler(len(ds), cfg.global_batch_size, seed=cfg.seed + (stage == "finetune"))
        self.num_micro = num_microbatches(cfg.global_batch_size, cfg.micro_batch_size, self.dp_size)

    def _build_model(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from otr_megatron.mcore.model import GPTBuildConfig, build_model_chunks, layout_invariant_init_

        self.build_cfg = GPTBuildConfig(
            vocab_size=self.tokenizer.vocab_size,
            seq_length=cfg.data.seq_length,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            ffn_hidden_size=m.ffn_hidden_size,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            position_embedding_type=m.position_embedding_type,
            share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            sequence_parallel=m.sequence_parallel,
            params_dtype="bfloat16" if m.bf16 else "float32",
            use_te=m.transformer_impl == "transformer_engine",
            fp8=m.fp8,
            hidden_dropout=m.hidden_dropout,
            attention_dropout=m.attention_dropout,
            init_method_std=m.init_method_std,
            calculate_per_token_loss=True,
        )
        chunks = build_model_chunks(self.build_cfg)
        layout_invariant_init_(chunks, seed=cfg.seed, std=m.init_method_std)
        if torch.cuda.is_available():
            for c in chunks:
                c.cuda()
        self.tconfig = chunks[0].config
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
        self.model = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_cfg, module=c) for c in chunks
        ]
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        _log(
            f"model GPT {m.num_layers}L h{m.hidden_size} heads{m.num_attention_heads} vocab "
            f"{self.tokenizer.vocab_size}->{self.build_cfg.padded_vocab_size}: {n_params} parameters on rank 0 "
            f"(tp={cfg.tp} pp={cfg.pp} dp={cfg.dp})"
        )

    def _build_optimizer(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            clip_grad=o.clip_grad,
            bf16=cfg.model.bf16,
            params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
            use_distributed_optimizer=False,
        )

        self.optimizer = get_megatron_optimizer(ocfg, self.model)
        c = self.tconfig
        c.finalize_model_grads_func = finalize_model_grads
        c.grad_scale_func = self.optimizer.scale_loss
        c.no_sync_func = self.model[0].no_sync if len(self.model) == 1 else [m.no_sync for m in self.model]

    # -- loss switching ------------------------------------------------------------------------
    def _install_loss(self, mode: str) -> None:
        """The single place the loss is chosen, always through the OTR hook.

        Pretraining uses the "sft" estimator: exact cross entropy over the real vocabulary. Megatron's
        own cross entropy would include the padded ids in the softmax, and the padding depends on the
        TP size, so the same job would train differently at TP=1 and TP=2.
        """
        if mode == self.loss_mode:
            return
        from otr_megatron.mcore.hook import enable_otr

        # the fine-tuning loss (any of the A/B arms) follows otr.normalization; the CE warm start
        # stays Megatron's token mean
        core_cfg = self.cfg.core_otr_config(mode)
        enable_otr(self.model, core_cfg, vocab_size=self.tokenizer.vocab_size)
        self.loss_mode = mode

    # -- batches -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        if torch.cuda.is_available():
            batch = {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return batch

    def _stage_of(self, it: int) -> tuple[str, int]:
        """('pretrain'|'finetune', step index within that stage) of global iteration `it`."""
        if it < self.cfg.pretrain_iters:
            return "pretrain", it
        return "finetune", it - self.cfg.pretrain_iters

    def _train_microbatches(self, it: int):
        stage, k = self._stage_of(it)
        ds = self.pretrain_data if stage == "pretrain" else self.train_data
        rows = self.samplers[stage].global_batch(k * self.cfg.global_batch_size)
        micro = split_global_batch(rows, self.cfg.micro_batch_size, self.dp_size, self.dp_rank)
        return ds, [self._to_device(ds.collate(mb)) for mb in micro]

    # -- learning rate ---------------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        """Linear warmup then cosine decay to optim.min_lr, restarted at each stage."""
        cfg = self.cfg
        stage, k = self._stage_of(it)
        n = cfg.pretrain_iters if stage == "pretrain" else cfg.finetune_iters
        peak = cfg.pretrain_lr if stage == "pretrain" else cfg.finetune_lr
        if peak is None:  # only None means "use optim.lr" (validate() refuses lr <= 0)
            peak = cfg.optim.lr
        lo = min(cfg.optim.min_lr, peak)
        w = min(cfg.optim.warmup_iters, max(n - 1, 0))
        if k < w:
            return peak * (k + 1) / w
        frac = (k - w) / max(n - w, 1)
        return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * frac))

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, it: int) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from otr_megatron.mcore.hook import set_iteration
        from otr_megatron.mcore.training import forward_step

        stage, _ = self._stage_of(it)
        self._install_loss("pretrain" if stage == "pretrain" else self.cfg.loss)
        set_iteration(self.model, it)
        lr = self.lr_at(it)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        _, micro = self._train_microbatches(it)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=self.model,
            num_microbatches=self.num_micro,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=False,
        )
        check_pending()  # once per step, before the update: this step's deferred input checks
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"iteration {it}: optimizer step skipped (non-finite gradients)")
        means = report_means(self._reduce_reports(reports, REPORT_NAMES))
        tokens = sum(int((mb["sample_ids"] >= 0).sum()) for mb in micro)
        t = torch.tensor([float(tokens)])
        if torch.distributed.is_initialized():
            t = t.to(_device())
            torch.distributed.all_reduce(t, group=_dp_group())
        out = {"iteration": it + 1, "stage": stage, "loss_name": "sft" if stage == "pretrain" else self.cfg.loss, "lr": lr}
        out.update({name.replace(" ", "_"): v for name, v in means.items()})
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        out["tokens"] = float(t.item())
        return out

    def _reduce_reports(self, reports, names) -> dict[str, tuple[float, float]]:
        """`{name: (sum, count)}` over micro-batches and the world: only the last pipeline stage's TP
        rank 0 contributes, so every rank gets the same DP-reduced totals."""
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        return reduce_reports(reports, names, group=group, contribute=self.is_last_stage and self.tp_rank == 0)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per split: mean CE of response tokens, per-token accuracy (argmax == label) and exact
        match (every response token and the closing EOS are the argmax, i.e. greedy decoding
        reproduces the answer)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for m in self.model:
            m.eval()
        out = {}
        try:
            for name, ds in self.eval_data.items():
                micro = eval_microbatches(len(ds), self.cfg.micro_batch_size, self.dp_size, self.dp_rank)
                batches = [self._to_device(ds.collate(mb)) for mb in micro]
                reports = get_forward_backward_func()(
                    forward_step_func=partial(_eval_forward_step, self.tokenizer.vocab_size),
                    data_iterator=iter(batches),
                    model=self.model,
                    num_microbatches=len(batches),
                    seq_length=self.cfg.data.seq_length,
                    micro_batch_size=self.cfg.micro_batch_size,
                    forward_only=True,
                )
                totals = self._reduce_reports(reports, EVAL_REPORTS)
                for n, (total, count) in totals.items():
                    out[f"{name}/{n}"] = total / max(count, 1.0)
                out[f"{name}/samples"] = int(totals["exact_match"][1])
        finally:
            for m in self.model:
                m.train()
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> str:
        """Save a checkpoint and move `latest` to it, only after checking the parameters are finite."""
        from otr_megatron.train.checkpoint import save_checkpoint

        if self._params_ok_at != self.iteration:
            problem = self.check_params()
            if problem:
                raise DivergenceError(self._divergence_message(self.iteration, problem))
        path = save_checkpoint(self, self.iteration)
        self.last_checkpoint = (path, self.iteration)
        _log(f"ckpt  saved iteration {self.iteration} to {path}")
        return path

    def maybe_resume(self) -> bool:
        from otr_megatron.train.checkpoint import load_checkpoint, select_checkpoint

        if not self.cfg.resume:
            return False
        path, note = select_checkpoint(self.ckpt_root)
        if note:
            _log(f"ckpt  {note}")
        load_checkpoint(self, path)
        self.last_checkpoint = (path, self.iteration)
        _log(f"ckpt  resumed from {path} at iteration {self.iteration}")
        return True

    # -- divergence guard ----------------------------------------------------------------------
    def check_params(self) -> str | None:
        """None if every parameter (all ranks) is finite with |w| <= cfg.max_param_abs, else what is
        wrong, naming the worst parameter. One [2]-element MAX all-reduce per call; the names are
        gathered only when something is wrong."""
        bound = self.cfg.max_param_abs
        named = [(n[len("module."):] if n.startswith("module.") else n, p)
                 for m in self.model for n, p in m.named_parameters()]
        with torch.no_grad():
            # max |w| per parameter without an abs() copy; NaN propagates, so non-finite shows here
            amax = [torch.linalg.vector_norm(p.detach(), ord=math.inf).float() for _, p in named]
            amax = torch.stack(amax) if amax else torch.zeros(1)
            finite = torch.isfinite(amax)
            flags = torch.stack([(~finite).any().float(), torch.where(finite, amax, torch.zeros_like(amax)).max()])
        flags = flags.double()
        if torch.distributed.is_initialized():
            flags = flags.to(_device())
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        flags = flags.cpu()
        if flags[0] == 0 and flags[1] <= bound:
            self._params_ok_at = self.iteration
            return None
        # the worst local parameter, then the worst over all ranks (non-finite first)
        local = None
        for (name, _), a in zip(named, amax.tolist()):
            score = (1, 0.0) if not math.isfinite(a) else (0, a)
            if local is None or score > local[0]:
                local = (score, name, a)
        worst = [local]
        if torch.distributed.is_initialized():
            worst = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(worst, local)
        _, name, a = max((w for w in worst if w is not None), key=lambda w: w[0])
        if not math.isfinite(a):
            return f"parameter {name} is not finite (max |w| = {a})"
        return f"parameter {name} has max |w| = {a:.3g} > max_param_abs={bound:g}"

    def check_step(self, rec: dict) -> None:
        """After every optimizer step, before anything is evaluated or saved: the step's loss and
        gradient norm and the updated parameters must be finite (and |w| within the bound)."""
        gnorm = rec.get("grad_norm")
        bad = [(k, rec[k]) for k in ("otr_loss", "lm_loss") if rec.get(k) is not None and not math.isfinite(rec[k])]
        if bad:
            what = "the {} loss".format(rec["loss_name"]) if bad[0][0] == "otr_loss" else "the label cross entropy"
            problem = f"{what} is {bad[0][1]}"
        elif gnorm is not None and not math.isfinite(gnorm):
            problem = f"the gradient norm is {gnorm}"
        else:
            problem = self.check_params()
        if problem:
            raise DivergenceError(self._divergence_message(rec["iteration"], problem))

    def _divergence_message(self, iteration: int, problem: str) -> str:
        """One line: where (iteration, stage, loss, lr), what, and which checkpoint is still good."""
        it0 = max(iteration - 1, 0)
        stage, _ = self._stage_of(min(it0, self.cfg.total_iters - 1))
        loss = "sft" if stage == "pretrain" else self.cfg.loss
        if self.last_checkpoint:
            path, at = self.last_checkpoint
            kept = f"nothing saved after iteration {at}: the latest checkpoint is still {path}"
        else:
            kept = "no checkpoint was saved"
        return (f"training diverged at iteration {iteration} ({stage} stage, {loss} loss, lr {self.lr_at(it0):.3g}): "
                f"{problem}; {kept} (lower the learning rate, then --resume or start again)")

    # -- the job -------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the checkpoint (or from scratch) to `total_iters` or `stop_at_iteration`, in an
        order that keeps the run directory honest: a refused resume raises before anything is written,
        and the summary is written only after the last step."""
        resumed = self.maybe_resume()  # a refused resume raises here, before anything is written
        finished = self._finished_summary(resumed)
        if finished is not None:
            return finished
        writer = self._open_run_record(resumed)
        first_eval = self._evaluate_at_start(resumed, writer)
        bar = self._progress_bar()
        last_eval = None
        if resumed:  # the run's record keeps its iteration-0 evaluation
            first_eval = _first_eval(self.metrics_path)
            if self.iteration >= self.cfg.total_iters:  # finished, but stopped before its summary was written
                last_eval = self.evaluate()
        try:
            last_eval = self._train_to_end(writer, bar, last_eval)
        finally:
            if bar is not None:
                bar.close()
        return self._write_summary(first_eval, last_eval)

    def _finished_summary(self, resumed: bool) -> dict | None:
        """The summary of a resumed run that has nothing left to train, else None. The launcher says
        so before any worker; this is for ranks started by torchrun directly."""
        summary_path = os.path.join(self.out, "summary.json")
        if not (resumed and self.iteration >= self.cfg.total_iters and os.path.isfile(summary_path)):
            return None
        _log(f"done  nothing to do: checkpoint at iteration {self.iteration} >= {self.cfg.total_iters} iterations; "
             f"{summary_path} unchanged")
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)

    def _open_run_record(self, resumed: bool) -> MetricsWriter | None:
        """config.yaml and the metrics writer (rank 0). A resumed run's metrics are cut back to its
        checkpoint, so the steps it trains again are recorded once."""
        if _rank0() and not resumed and os.path.exists(self.metrics_path):  # the launcher checks this first
            raise RunDirError(f"{self.metrics_path} exists: a fresh run never deletes results (use --overwrite)")
        if _rank0():
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump_yaml(self.cfg))
        if _rank0() and resumed and os.path.exists(self.metrics_path):
            _truncate_metrics(self.metrics_path, self.iteration)
        return MetricsWriter(self.metrics_path) if _rank0() else None

    def _evaluate_at_start(self, resumed: bool, writer: MetricsWriter | None) -> dict | None:
        """The iteration-0 evaluation of a fresh run: the baseline every later one is read against."""
        cfg = self.cfg
        if not (cfg.eval_at_start and not resumed and cfg.eval_interval > 0):
            return None
        first_eval = self.evaluate()
        if writer:
            writer.write({"iteration": 0, "kind": "eval", **first_eval})
        _log("eval  it 0 " + _fmt_eval(first_eval))
        return first_eval

    def _progress_bar(self):
        if not (_rank0() and self.cfg.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.total_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                    mininterval=0.5)

    def _train_to_end(self, writer: MetricsWriter | None, bar, last_eval: dict | None) -> dict | None:
        """Step by step: train, record, check for divergence, show progress, then evaluate and save
        where due. Returns the latest evaluation."""
        cfg = self.cfg
        t_last = time.time()
        while self.iteration < cfg.total_iters:
            rec, t_last = self._train_iteration(t_last)
            if writer:
                writer.write(rec)
            self.check_step(rec)  # before any eval or save of these weights
            self._show_progress(bar, rec, last_eval)
            boundary = self.iteration == cfg.pretrain_iters and 0 < cfg.pretrain_iters < cfg.total_iters
            done = self.iteration == cfg.total_iters
            if (cfg.eval_interval and self.iteration % cfg.eval_interval == 0) or done or boundary:
                last_eval = self._evaluate_and_record(writer, bar, rec["loss_name"])
            stop = cfg.stop_at_iteration > 0 and self.iteration == cfg.stop_at_iteration and not done
            if (cfg.save_interval and self.iteration % cfg.save_interval == 0) or done or boundary or stop:
                self.save()
            if stop:
                _log(f"stop  at iteration {self.iteration} (stop_at_iteration); continue with --resume")
                break
        return last_eval

    def _train_iteration(self, t_last: float) -> tuple[dict, float]:
        """One optimizer step as a metrics record (throughput since `t_last`), and its end time."""
        it = self.iteration
        try:
            rec = self.train_step(it)
        except FloatingPointError as e:  # non-finite loss (loss_func) or skipped step (fp16/bf16)
            raise DivergenceError(self._divergence_message(it + 1, str(e))) from None
        self.iteration = it + 1
        now = time.time()
        rec["tokens_per_s"] = rec["tokens"] / max(now - t_last, 1e-9)
        rec["kind"] = "train"
        return rec, now

    def _show_progress(self, bar, rec: dict, last_eval: dict | None) -> None:
        """The bar's postfix (stage, losses, hit rate, throughput, latest exact match), or without a
        bar a log line every `log_interval` steps."""
        cfg = self.cfg
        if bar is not None:
            post = {"stage": rec["loss_name"], "ce": f"{rec.get('lm_loss', float('nan')):.3f}"}
            if rec["loss_name"] != "sft" and "otr_loss" in rec:  # sft: the loss is the CE
                post["loss"] = f"{rec['otr_loss']:.3f}"
            if "otr_hit_rate" in rec:
                post["hit"] = f"{rec['otr_hit_rate']:.3f}"
            post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
            if last_eval:
                k = next(iter(self.eval_data))
                post[f"{k}_em"] = f"{last_eval[f'{k}/exact_match']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        elif cfg.log_interval and self.iteration % cfg.log_interval == 0:
            _log(f"train it {self.iteration} " + json.dumps({k: v for k, v in rec.items() if k != "kind"}))

    def _evaluate_and_record(self, writer: MetricsWriter | None, bar, loss_name: str) -> dict:
        ev = self.evaluate()
        if writer:
            writer.write({"iteration": self.iteration, "kind": "eval", **ev})
        msg = f"eval  it {self.iteration} ({loss_name}) " + _fmt_eval(ev)
        if bar is not None:
            bar.write(msg)  # above the bar, which stays on its line
        else:
            _log(msg)
        return ev

    def _write_summary(self, first_eval: dict | None, last_eval: dict | None) -> dict:
        """summary.json and the curves (rank 0), also after a `stop_at_iteration` stop: its
        `iterations` says how far the run got."""
        summary = {"first_eval": first_eval, "final_eval": last_eval, "iterations": self.iteration}
        if _rank0():
            with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            if self.cfg.plot:
                from otr_megatron.train.plot import plot_metrics

                png = plot_metrics(self.metrics_path, os.path.join(self.out, "curves.png"), self.cfg.pretrain_iters)
                _log(f"plot  {png}")
            _log(f"done  metrics {self.metrics_path}")
        return summary


def _eval_forward_step(vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # [b, s, V/tp] (last stage)
    return logits, partial(_eval_loss, vocab_size, batch)


def _eval_loss(vocab_size: int, batch: dict, logits: torch.Tensor):
    """CE, token accuracy and per-sample exact match from vocab-parallel logits [b, s, V/tp]."""
    from megatron.core import parallel_state as ps

    from otr_megatron.core import OTRConfig, vocab_parallel_otr_loss

    labels, mask, sids = batch["labels"], batch["loss_mask"], batch["sample_ids"]
    logits = logits.float()
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    # cross entropy over the real vocabulary (Megatron's would count the TP-dependent padding)
    ce = vocab_parallel_otr_loss(logits, labels, OTRConfig(estimator="sft"), tp_group=tp_group, vocab_size=vocab_size)
    # argmax over the real vocabulary across TP shards: local (max, id), then a tiny all-gather.
    vloc = logits.size(-1)
    tp = ps.get_tensor_model_parallel_world_size()
    start = ps.get_tensor_model_parallel_rank() * vloc
    ids = torch.arange(start, start + vloc, device=logits.device)
    logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    mx, arg = logits.max(dim=-1)
    arg = arg + start
    if tp > 1:
        group = ps.get_tensor_model_parallel_group()
        mxs = [torch.empty_like(mx) for _ in range(tp)]
        args = [torch.empty_like(arg) for _ in range(tp)]
        torch.distributed.all_gather(mxs, mx.contiguous(), group=group)
        torch.distributed.all_gather(args, arg.contiguous(), group=group)
        best = torch.stack(mxs).argmax(dim=0)  # first maximum: lowest vocab id on ties, like argmax
        arg = torch.stack(args).gather(0, best[None]).squeeze(0)
    sup = mask > 0
    correct = (arg == labels) & sup
    n = sup.sum().double()
    wrong = (~correct & sup).double()
    uniq, inv = torch.unique(sids[sup], return_inverse=True)
    wrong_per = torch.zeros(len(uniq), dtype=torch.float64, device=wrong.device).index_add_(0, inv, wrong[sup])
    n_samples = torch.tensor(float(len(uniq)), dtype=torch.float64, device=wrong.device)
    report = {
        "ce": torch.stack([(ce.double() * sup).sum(), n]),
        "token_acc": torch.stack([correct.double().sum(), n]),
        "exact_match": torch.stack([(wrong_per == 0).double().sum(), n_samples]),
    }
    return torch.zeros((), device=logits.device), 1, report


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _fmt_eval(ev: dict) -> str:
    parts = []
    for k, v in ev.items():
        if k.endswith("/samples"):
            continue
        parts.append(f"{k}={v:.3f}")
    return " ".join(parts)


class MetricsWriter:
    """Appends one JSON object per line and flushes, so a crash keeps everything written so far."""

    def __init__(self, path: str):
        self.path = path

    def write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def _first_eval(path: str) -> dict | None:
    """The iteration-0 evaluation recorded in metrics.jsonl (None if there is none)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("kind") == "eval" and rec.get("iteration") == 0:
                    return {k: v for k, v in rec.items() if k not in ("kind", "iteration")}
    except OSError:
        pass
    return None


def _truncate_metrics(path: str, iteration: int) -> None:
    """On resume, drop records written after the checkpoint's iteration (they will be redone)."""
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("iteration", 0) <= iteration:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)
