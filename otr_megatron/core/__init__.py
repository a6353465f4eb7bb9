"""Pure-PyTorch core: the OTR math over vocab-parallel logits. No Megatron import here."""

from otr_megatron.core.config import ESTIMATORS, OTRConfig
from otr_megatron.core.loss import vocab_parallel_otr_loss

__all__ = ["ESTIMATORS", "OTRConfig", "vocab_parallel_otr_loss"]
