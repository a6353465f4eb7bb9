"""Memory and communication budget per GPU for a Megatron layout (`otr-megatron plan`)."""

from otr_megatron.planning.budget import (
    GIB,
    Budget,
    Layout,
    LossSettings,
    ModelDims,
    activation_bytes,
    activation_bytes_per_layer,
    bytes_per_param_mixed_precision,
    check_config,
    check_layout,
    communication_bytes,
    from_config,
    loss_memory,
    plan,
)

__all__ = [
    "GIB",
    "Budget",
    "Layout",
    "LossSettings",
    "ModelDims",
    "activation_bytes",
    "activation_bytes_per_layer",
    "bytes_per_param_mixed_precision",
    "check_config",
    "check_layout",
    "communication_bytes",
    "from_config",
    "loss_memory",
    "plan",
]
