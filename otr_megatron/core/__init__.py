"""Pure-PyTorch core: the OTR math over vocab-parallel logits. No Megatron import here."""

from otr_megatron.core.config import ESTIMATORS, OTRConfig
from otr_megatron.core.linear_loss import vocab_parallel_linear_otr_loss
from otr_megatron.core.loss import check_pending, vocab_parallel_otr_loss

__all__ = ["ESTIMATORS", "OTRConfig", "check_pending", "vocab_parallel_linear_otr_loss", "vocab_parallel_otr_loss"]
