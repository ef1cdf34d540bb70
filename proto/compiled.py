"""Which compiled hot paths this process uses.

nvpool's data plane has a pure-Python implementation, which is the specification, and optional C
modules (built by ``pip install`` where a compiler is present) that serve the common case faster and
hand everything else back to the Python code (see each module's header comment). ``load(name)``
returns the compiled module, or None when it is not built, fails to import, or the environment says
``NVPOOL_PURE_PYTHON=1`` (the switch the test suite uses to run on the reference implementation).
The choice is made when the using module is imported; ``status()`` says what was chosen, for
``nvpool --version`` and the agents' metrics.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

#: every compiled module, by the pure-Python module whose hot path it serves
MODULES = {
    "nvpool.agents._cserve": "nvpool.agents.dataplane (the agent's command loop)",
    "nvpool.proto._ccomplete": "nvpool.proto.transport (the client's completion path)",
    "nvpool.client.nbd._cnbd": "nvpool.client.nbd.server (the NBD export's transmission loop)",
    "nvpool.client._csync": "nvpool.client.syncpath (the blocking API's round trip)",
}


def pure_python() -> bool:
    """True when ``NVPOOL_PURE_PYTHON`` asks for the reference implementation everywhere."""
    return os.environ.get("NVPOOL_PURE_PYTHON", "").strip().lower() not in ("", "0", "no", "false")


def load(name: str) -> Optional[ModuleType]:
    if pure_python():
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        logger.debug("compiled module %s is not available (%s): using the pure-Python path", name, exc)
        return None


def status() -> dict[str, str]:
    """Module -> "compiled", "disabled (NVPOOL_PURE_PYTHON)" or "not built"."""
    out = {}
    for name in MODULES:
        if pure_python():
            out[name] = "disabled (NVPOOL_PURE_PYTHON)"
            continue
        try:
            importlib.import_module(name)
            out[name] = "compiled"
        except ImportError:
            out[name] = "not built"
    return out
