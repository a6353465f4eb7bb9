"""One name for the CPU modes: `enable_cpu_mode(force=False)` in mcore, Bridge and NeMo (issue 16).

The old names stay as thin aliases that warn and delegate, so scripts written against them keep
working. The real patching is covered where each layer runs for real (tests/mcore/test_cpu_backend.py,
tests/bridge, tests/nemo); here each alias is checked against a recorder standing in for the new
function, so nothing patches this process's torch.
"""

import inspect
import warnings

import pytest

from otr_megatron.bridge import cpu as bridge_cpu
from otr_megatron.mcore import cpu_backend as mcore_cpu
from otr_megatron.nemo import cpu as nemo_cpu

LAYERS = {"mcore": mcore_cpu, "bridge": bridge_cpu, "nemo": nemo_cpu}
OLD_NAMES = [(mcore_cpu, "enable_cpu_backend", "enable_cpu_mode"),
             (mcore_cpu, "cpu_backend_enabled", "cpu_mode_enabled"),
             (bridge_cpu, "enable", "enable_cpu_mode"),
             (nemo_cpu, "enable_nemo_cpu", "enable_cpu_mode")]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_has_enable_cpu_mode_with_the_same_signature(layer):
    sig = inspect.signature(LAYERS[layer].enable_cpu_mode)
    assert list(sig.parameters) == ["force"] and sig.parameters["force"].default is False


def test_mcore_package_exports_the_new_names():
    import otr_megatron.mcore as mcore

    assert mcore.enable_cpu_mode is mcore_cpu.enable_cpu_mode
    assert mcore.cpu_mode_enabled is mcore_cpu.cpu_mode_enabled
    assert {"enable_cpu_mode", "cpu_mode_enabled"} <= set(mcore.__all__)


@pytest.mark.parametrize("module, old, new", OLD_NAMES, ids=[f"{m.__name__}.{o}" for m, o, _ in OLD_NAMES])
def test_old_name_warns_and_delegates(monkeypatch, module, old, new):
    calls = []
    sentinel = object()

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return sentinel

    monkeypatch.setattr(module, new, recorder)
    takes_force = "force" in inspect.signature(getattr(module, old)).parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = getattr(module, old)(True) if takes_force else getattr(module, old)()
    assert result is sentinel
    assert calls == [((True,), {})] if takes_force else calls == [((), {})]
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 1 and messages[0].endswith(f".{old} is deprecated; use {new}"), messages
    assert caught[0].filename == __file__  # stacklevel points at the caller, not the alias
