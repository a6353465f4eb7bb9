"""otr_megatron: One-Token Rollout fine-tuning over vocab-parallel logits for the NVIDIA stack.

`import otr_megatron` needs only torch; the Megatron-Core, Megatron-Bridge, NeMo and launcher
layers live in subpackages that import their frameworks when used.
"""

import os as _os

from otr_megatron.core import (ESTIMATORS, OTRConfig, check_pending, vocab_parallel_linear_otr_loss,
                               vocab_parallel_otr_loss)

__version__ = "0.1.0"
__all__ = ["ESTIMATORS", "OTRConfig", "check_pending", "vocab_parallel_linear_otr_loss", "vocab_parallel_otr_loss",
           "__version__"]

if _os.environ.get("OTR_MEGATRON_CONSOLE_DIR"):  # a worker started by our CLI: the same quiet console
    from otr_megatron import console as _console

    _console.install()
