"""Regional compilation of a TokenFormer (`train.compile`), as torchtitan does it: every block is compiled
with `Module.compile` — one graph, traced once and reused by all layers, since the blocks share their code
and shapes — and the loss head (final LayerNorm, tied output layer, cross entropy) is compiled as a region of
its own. The embedding (one gather forward, one scatter-add backward) and whatever DeepSpeed runs around the
model stay eager.

Why regions and not the whole model: the blocks are identical, so one compilation serves all of them (the
whole model would be traced layer by layer, 12× the compile time for the same kernels), and collectives
(TP mappings, ZeRO 3's parameter gathers, which DeepSpeed marks `torch.compiler.disable`) become graph
breaks between regions rather than inside one huge graph. Why `Module.compile` and not `torch.compile(m)`:
the wrapper `torch.compile` returns prefixes every parameter name with `_orig_mod.`, which would change the
state_dict, the sharding table's names, checkpoints and the HF export; `Module.compile` keeps them.

Inside a compiled block the lean Pattention becomes `pattention.compiled_lean_pattention` (the plain formula
under a selective-checkpoint policy): the compiler fuses the normalization and its backward, and keeps the
lean Function's saved set.

A failure to compile is an error (`CompileError`, one line naming `train.compile`), never a silent fallback
to eager: dynamo's `suppress_errors` is switched off and hitting the recompile limit raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tokenformer_dist.config import COMPILE_BACKENDS, COMPILE_MODES


class CompileError(RuntimeError):
    """torch.compile failed on this model (one line; the trainer exits 2 with it)."""


def compile_model(model: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> torch.nn.Module:
    """Compile `model`'s blocks and loss head in place (lazily: the work happens at the first forward).
    `backend` "aot_eager" traces and partitions the same graphs without generating kernels."""
    import torch._dynamo.config as dynamo_config

    if mode not in COMPILE_MODES or backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile mode {mode!r} / backend {backend!r}; valid: {', '.join(COMPILE_MODES)} / "
                         f"{', '.join(COMPILE_BACKENDS)}")
    # options such as the mode are Inductor's: another backend takes none
    options = {"mode": mode} if backend == "inductor" else {}
    # a process that trains several models one after another (the tests, bench scripts) would otherwise
    # accumulate one set of guards per model until the recompile limit; compiled kernels stay in Inductor's
    # cache, so starting afresh costs tracing, not code generation
    torch._dynamo.reset()
    dynamo_config.suppress_errors = False  # a compile failure is an error, never eager in disguise
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True  # past the limit dynamo would run eager silently
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False, **options)
    # an instance attribute shadowing the method: forward() calls self.head, names and state_dict unchanged
    model.head = torch.compile(model.head, backend=backend, dynamic=False, **options)
    return model


def keep_hooks_eager(model: torch.nn.Module) -> None:
    """Run the module hooks other code registered inside the compiled regions (DeepSpeed ZeRO 3's parameter
    gathers and releases, on every submodule) eagerly, without tracing them.

    They are graph breaks either way (collectives, Python bookkeeping); what tracing them adds is one
    compilation per module — each hook is a closure over its own module, so the guards fail for the next
    one — until dynamo's recompile limit is hit. Call after the hooks are registered (deepspeed.initialize).
    """
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in hooks.items():
                if not getattr(hook, "_tokenformer_eager", False):
                    eager = torch.compiler.disable(hook)
                    eager._tokenformer_eager = True
                    hooks[key] = eager


@contextlib.contextmanager
def compile_errors(setting: str) -> Iterator[None]:
    """Turn a torch.compile failure inside the block into a one-line CompileError naming `setting`."""
    import torch._dynamo.exc as dynamo_exc
    from torch._inductor.exc import InductorError

    # FailOnRecompileLimitHit is not a TorchDynamoException (torch 2.13)
    failures = (dynamo_exc.TorchDynamoException, InductorError,
                *(c for c in (getattr(dynamo_exc, "FailOnRecompileLimitHit", None),) if c is not None))
    try:
        yield
    except failures as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CompileError(f"{setting}: torch.compile failed ({type(e).__name__}: {first[:300]}); "
                           f"set train.compile=false to train eagerly") from e
