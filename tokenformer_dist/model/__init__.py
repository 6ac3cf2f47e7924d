"""The TokenFormer model: plain torch modules (pattention, lean, attention, tokenformer — no megatron-core)
and the tensor-parallel step (`tensor_parallel.parallelize`, the one module that imports megatron-core). Submodules are
imported lazily, so that light tools (the expansion tool's init math) pay only for what they use."""

from typing import Any

_EXPORTS = {"Pattention": "pattention", "pattention": "pattention", "TokenFormer": "tokenformer",
            "parallelize": "tensor_parallel"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
