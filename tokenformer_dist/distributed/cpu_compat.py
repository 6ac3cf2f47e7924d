"""megatron-core shims for CPU-only torch builds. Applied by `launch.init_distributed` only when CUDA is absent.

megatron-core allocates communication buffers and rotary frequencies on `torch.cuda.current_device()`,
which raises "Torch not compiled with CUDA enabled" on a CPU build. Pointing it at the CPU device is the
whole shim: on a CPU build every such call would otherwise fail, so no working path changes. On a GPU
machine nothing here runs.
"""

from __future__ import annotations

import importlib

import torch

_applied = False


def apply_cpu_shims() -> bool:
    """Patch what megatron-core needs to run its tensor-parallel mappings and rotary embedding on CPU.

    Returns True when the shims are active (CUDA absent), False on a CUDA machine (nothing patched).
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")
        _skip_deepspeed_shm_build()
        _applied = True
    return True


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (~30 s) that only its inference path
    uses; training over gloo does not need it. Patch the module object itself (a plain
    `import deepspeed.comm.torch` binds the torch package, not the module)."""
    try:
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except Exception:  # deepspeed not importable: nothing to skip
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None
