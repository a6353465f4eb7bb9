"""NeMo 2.0 classes in NeMo's own pattern: a loss reduction and a GPTModel subclass.

Importing this module imports NeMo (nemo-toolkit <= 2.7 with `nemo.collections.llm`); use
`otr_megatron.nemo.load_adapter()` to get a clear message when that is not available.

`OTRGPTModel` keeps the model's `GPTConfig` (Llama3Config70B, Qwen25Config72B, ...) and
optimizer, builds the same Megatron-Core GPTModel, and only (1) runs `otr_forward_step` around the
config's forward step, (2) uses `OTRMaskedTokenLossReduction`, which reduces the per-token OTR
loss exactly as `MaskedTokenLossReduction` reduces cross entropy and keeps the OTR reports, and (3)
logs those reports each step (`self.log`: "lm loss", "otr loss", "otr hit rate", ...).
"""

from __future__ import annotations

from typing import Optional

import torch

from otr_megatron.nemo.compat import check_nemo_version

check_nemo_version()

from nemo.collections.llm.gpt.model.base import GPTModel  # noqa: E402
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction  # noqa: E402

from otr_megatron.nemo.step import (  # noqa: E402
    otr_forward_step,
    otr_report,
    reduce_otr_metrics,
    sequence_normalized_batch,
)


class OTRMaskedTokenLossReduction(MaskedTokenLossReduction):
    """`MaskedTokenLossReduction` plus OTR metrics ([sum, count] per micro-batch; `last_metrics` per step)."""

    def __init__(self, validation_step: bool = False, val_drop_last: bool = True,
                 normalization: str = "token") -> None:
        super().__init__(validation_step=validation_step, val_drop_last=val_drop_last)
        self.last_metrics: dict = {}
        self.normalization = normalization

    def forward(self, batch, forward_out):
        if self.normalization == "sequence":
            return self._forward_per_sequence(batch, forward_out)
        *head, reduced = super().forward(batch, forward_out)
        out = forward_out[0] if isinstance(forward_out, tuple) else forward_out
        return (*head, {**reduced, **otr_report(batch, out)})

    def _forward_per_sequence(self, batch, forward_out):
        """NeMo's contract `(loss_sum, count, {"loss_sum_and_ub_size": [sum, count]})` with the sum of
        the sequences' own means and the number of sequences as the count (exact integers: NeMo casts
        its count to int, which would truncate a sum of 1/length weights). Each CP rank holds a slice
        of every row, so the count is contributed by CP rank 0 only."""
        from megatron.core import parallel_state as ps

        if isinstance(forward_out, tuple):
            raise NotImplementedError("otr normalization='sequence' with (logits, loss_mask) model outputs")
        cp = ps.get_context_parallel_world_size()
        weighted = sequence_normalized_batch(batch, cp_group=ps.get_context_parallel_group() if cp > 1 else None)
        loss_sum = (forward_out.float() * weighted["loss_mask"].to(forward_out.device)).sum()
        first_cp_rank = cp == 1 or ps.get_context_parallel_rank() == 0
        count = weighted["num_valid_tokens_in_ub"].to(loss_sum.device, torch.int) * int(first_cp_rank)
        pair = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
        return loss_sum, count, {"loss_sum_and_ub_size": pair, **otr_report(batch, forward_out), "otr loss": pair}

    def reduce(self, losses_reduced_per_micro_batch):
        if losses_reduced_per_micro_batch:
            from megatron.core import parallel_state as ps

            self.last_metrics = reduce_otr_metrics(
                losses_reduced_per_micro_batch, group=ps.get_data_parallel_group(with_context_parallel=True))
        return super().reduce(losses_reduced_per_micro_batch)


class OTRGPTModel(GPTModel):
    """A NeMo 2.0 GPTModel whose training loss is OTR. `otr` is an `otr_megatron.OTRConfig`."""

    def __init__(self, config=None, optim=None, tokenizer=None, model_transform=None, model_context_managers=None,
                 otr=None, vocab_size: Optional[int] = None):
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform,
                         model_context_managers=model_context_managers or [])
        from otr_megatron import OTRConfig

        self.otr = otr if otr is not None else OTRConfig()
        self.otr_vocab_size = vocab_size

    def forward_step(self, batch):
        # Training and validation both go through the OTR step: once the hook is on the Megatron-Core
        # model, every forward with labels computes the OTR loss and needs this micro-batch's context.
        return otr_forward_step(self, batch, otr_config=self.otr, vocab_size=self.otr_vocab_size,
                                base_step=self.config.forward_step_fn)

    @property
    def training_loss_reduction(self) -> OTRMaskedTokenLossReduction:
        if not self._training_loss_reduction:
            self._training_loss_reduction = OTRMaskedTokenLossReduction(normalization=self.otr.normalization)
        return self._training_loss_reduction

    def otr_metrics(self) -> dict:
        """The OTR reports of the last optimizer step, reduced over micro-batches and DP x CP (last
        pipeline stage only; {} elsewhere)."""
        red = self._training_loss_reduction
        return dict(getattr(red, "last_metrics", {}) or {})

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Log every OTR report of the step to NeMo's loggers under its own name.

        NeMo itself logs `reduced_train_loss`: the loss it backpropagates, i.e. the OTR surrogate
        (equal to "otr loss"), not the label cross entropy that SFT runs show there; "lm loss" is that
        cross entropy.
        """
        for name, value in self.otr_metrics().items():
            self.log(name, value, batch_size=1, prog_bar=name in ("lm loss", "otr hit rate"))
