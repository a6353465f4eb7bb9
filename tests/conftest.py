"""Every test session generates the ``assets:`` files into a cache of its own: the tests never read
or write the user's ~/.cache, and each session exercises the first-use generation. Set in
`pytest_configure` (before collection), in the environment, so `otr-megatron` subprocesses inherit it."""

import os
import shutil
import tempfile

_CACHE_ENV = "OTR_MEGATRON_CACHE"  # otr_megatron.data.assets.CACHE_ENV (not imported: that pulls in torch)
_session_cache = None


def pytest_configure(config):
    global _session_cache
    _session_cache = tempfile.mkdtemp(prefix="otr-megatron-test-cache-")
    os.environ[_CACHE_ENV] = _session_cache


def pytest_unconfigure(config):
    if _session_cache:
        shutil.rmtree(_session_cache, ignore_errors=True)
