"""otr_megatron: One-Token Rollout fine-tuning over vocab-parallel logits for the NVIDIA stack.

`import otr_megatron` needs only torch; the Megatron-Core, Megatron-Bridge, NeMo and launcher
layers live in subpackages that import their frameworks when used.
"""

from otr_megatron.core import ESTIMATORS, OTRConfig, check_pending, vocab_parallel_otr_loss

__version__ = "0.1.0"
__all__ = ["ESTIMATORS", "OTRConfig", "check_pending", "vocab_parallel_otr_loss", "__version__"]
