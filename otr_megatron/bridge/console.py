"""Show the OTR metrics that Megatron-Bridge's console line drops.

Bridge's `training_log` prints each reduced loss-dict average only `if avg >= 0.0`. "lm loss" (the
label cross entropy) and "otr hit rate" are never negative and appear there; "otr loss" (the
surrogate, slightly negative with beta < 0) and "otr mean reward" usually are, and only reach
TensorBoard / W&B. `OTRConsoleMetrics` is a Bridge training callback (`finetune/pretrain(cfg, step,
callbacks=[OTRConsoleMetrics()])`; `otr-megatron bridge` passes it) that prints them on a second
line right after Bridge's, from the same numbers: `on_train_step_end`'s `loss_dict` is what Bridge
logs (micro-batch `[sum, count]` pairs summed, all-reduced over DP x CP and divided, on the last
pipeline stage), averaged over the log interval over non-skipped iterations like `training_log`,
printed by the last rank like `print_rank_last`. It reads values only on logging iterations, so on
a GPU it adds one host sync per logged line, as Bridge's own line does.
"""

from __future__ import annotations

from typing import Optional


class OTRConsoleMetrics:
    """Bridge callback (duck-typed: Bridge's `CallbackManager.add` registers any object's `on_*`
    methods, so this module imports nothing from Bridge)."""

    def __init__(self, names: Optional[frozenset] = None):
        from otr_megatron.mcore.metrics import NEGATIVE_REPORTS

        self.names = frozenset(NEGATIVE_REPORTS if names is None else names)
        self._sums: dict = {}
        self._iterations = 0

    def on_train_step_end(self, context) -> None:
        if context.skipped_iter or not context.loss_dict:
            return
        for key, value in context.loss_dict.items():
            self._sums[key] = self._sums.get(key, 0.0) + value.detach()  # stays on the device until logged
        self._iterations += 1

    # Bridge increments train_state.step and prints its line after on_train_step_end: print ours at
    # the next event, where step is the iteration Bridge printed.
    def on_train_step_start(self, context) -> None:
        self._flush(context)

    def on_eval_start(self, context) -> None:
        self._flush(context)

    def on_train_end(self, context) -> None:
        self._flush(context)

    def _flush(self, context) -> None:
        state = context.state
        logger = state.cfg.logger
        iteration = int(state.train_state.step)
        if not self._iterations or not logger.log_interval or iteration % logger.log_interval:
            return
        means = {k: float(v) / self._iterations for k, v in self._sums.items()}
        self._sums, self._iterations = {}, 0
        shown = {k: v for k, v in means.items() if k in self.names or v < 0.0}
        if not shown or getattr(logger, "skip_train_metrics_log", False) or not _is_last_rank():
            return
        fields = "".join(f" {k}: {v:.6E} |" for k, v in shown.items())
        print(f" [otr] iteration {iteration:8d}/{state.cfg.train.train_iters:8d} |{fields}", flush=True)


def _is_last_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
