"""Megatron-Bridge adapter: an OTR forward step, the `otr-megatron bridge` command, a console
callback for the OTR metrics, a CPU mode and a tiny CPU recipe.

Nothing here imports Megatron-Bridge at import time: the command and the step import it when they
run, so `otr-megatron slurm` and the core work where Bridge is not installed.
"""

from otr_megatron.bridge.step import OTRForwardStep

__all__ = ["OTRForwardStep"]
