"""The TokenFormer model. Submodules are imported lazily, so that light tools (the expansion tool's
init math) do not pay for importing megatron-core."""

from typing import Any

_EXPORTS = {"Pattention": "pattention", "ShardedPattention": "pattention", "pattention": "pattention",
            "TokenFormer": "tokenformer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
