"""Which NeMo is installed, and whether it still has the NeMo 2.0 LLM API (nemo-toolkit <= 2.7)."""

from __future__ import annotations

import importlib.util
from typing import Optional

BRIDGE_HINT = (
    "use the Megatron-Bridge path instead: `otr-megatron bridge --recipe "
    "megatron.bridge.recipes.llama:llama3_70b_sft_config otr.num_samples=256` (NeMo Framework containers 26.04+) "
    "or otr_megatron.bridge.OTRForwardStep with megatron.bridge.training.finetune"
)


class NeMoVersionError(ImportError):
    """The installed NeMo cannot run the NeMo 2.0 OTR adapter."""


def installed_nemo_version() -> Optional[str]:
    from importlib import metadata

    for name in ("nemo-toolkit", "nemo_toolkit"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def has_llm_collection() -> bool:
    try:
        return importlib.util.find_spec("nemo.collections.llm") is not None
    except (ImportError, ValueError):
        return False


def check_nemo_version(version: Optional[str] = None, has_llm: Optional[bool] = None) -> str:
    """Return the NeMo version if it has `nemo.collections.llm`; otherwise raise with the Bridge path.

    nemo-toolkit 3.x is speech-only (no LLM collections); 2.x up to 2.7 (container nemo:26.02) has
    the NeMo 2.0 LLM API this adapter plugs into.
    """
    version = installed_nemo_version() if version is None else version
    if version is None:
        raise NeMoVersionError(f"nemo-toolkit is not installed; the NeMo 2.0 adapter needs nemo-toolkit 2.x "
                               f"(<= 2.7, container nvcr.io/nvidia/nemo:26.02) -- or {BRIDGE_HINT}")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major >= 3:
        raise NeMoVersionError(
            f"nemo-toolkit {version} has no LLM collections (NeMo 3 is speech-only; LLM training moved to "
            f"Megatron-Bridge): {BRIDGE_HINT}"
        )
    if major != 2:
        raise NeMoVersionError(f"nemo-toolkit {version}: the adapter supports the NeMo 2.0 API (2.x <= 2.7); {BRIDGE_HINT}")
    has_llm = has_llm_collection() if has_llm is None else has_llm
    if not has_llm:
        raise NeMoVersionError(f"nemo-toolkit {version} is installed without nemo.collections.llm "
                               f"(install nemo-toolkit[nlp] or use the NeMo container); or {BRIDGE_HINT}")
    return version
