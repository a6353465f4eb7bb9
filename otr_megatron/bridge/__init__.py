"""Megatron-Bridge adapter: an OTR forward step and the `otr-megatron bridge` command.

Nothing here imports Megatron-Bridge at import time (it needs Transformer Engine and a GPU).
"""

from otr_megatron.bridge.step import OTRForwardStep

__all__ = ["OTRForwardStep"]
