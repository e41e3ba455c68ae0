"""ffnn: the tutorials' MNIST MLP trained end to end with this library's fused kernels.

Commands: ``python -m ffnn.train``, ``python -m ffnn.evaluate``, ``python -m ffnn.predict``
(also installed as ffnn-train, ffnn-evaluate, ffnn-predict).

The names below are imported on first use, so that ``python -m ffnn.<command>`` can set up its
Ctrl-C handling (ffnn/launch.py) before torch is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MLP": "ffnn.model", "TorchMLP": "ffnn.model", "build_model": ("ffnn.model", "build"),
    "count_parameters": "ffnn.model", "load_data": ("ffnn.data", "load"), "read_idx": "ffnn.data",
    "Data": "ffnn.data", "CLASSES": "ffnn.data", "FFNNError": "ffnn.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'ffnn' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(module), attribute)
