"""Trainer checkpoints: DeepSpeed's own files plus what this project needs to resume, reshard and evaluate.

    RUN/checkpoints/<tag>/            tag = step_00000100
        mp_rank_XX_model_states.pt, *_optim_states.pt   DeepSpeed (module, ZeRO partitions, client state)
        model_tp{r:02d}.safetensors   fp32 MASTER weights of TP rank r (any ZeRO stage), tau buffers included
        rng_rank{g:04d}.safetensors   RNG states of global rank g (CPU; CUDA + megatron tracker on GPU)
        config.yaml                   resolved config
        meta.json                     step, tp, dp, zero_stage, tokens, loader state; written last
        universal/                    (made on demand) DeepSpeed universal checkpoint, for a new DP size
    RUN/checkpoints/latest            text: the tag of the newest COMPLETE checkpoint (atomic rename)

A checkpoint is written as `<tag>.partial` and renamed only after every rank has finished; `latest` moves
only after that, so a crash mid-write leaves the previous checkpoint as the one that is loaded.

The run directory is shared by all nodes (`check_run_dir_shared`, at start-up). What it holds is read by
rank 0 for every decision that gates a collective (which checkpoint to resume, whether a save is already
done, the universal conversion) and handed to the other ranks (`comm.decide_on_rank0`); each rank then
checks it sees what rank 0 decided on (`comm.require_on_every_rank`), so a node with a stale view of
`latest` stops the job with one line instead of resuming another step or hanging in a collective.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenformer_dist.atomic import atomic_path, atomic_write_text
from tokenformer_dist.checkpoint.weights import CONFIG, META, checkpoint_tp, is_weights_dir, load_weights, rank_file
from tokenformer_dist.config import Config, config_yaml, load_config
from tokenformer_dist.distributed import comm
from tokenformer_dist.distributed.sharding import (
    full_shape,
    is_tp_sharded,
    join_parts,
    local_part,
    universal_checkpoint_info,
    universal_restore_meta,
)

LATEST = "latest"
UNIVERSAL = "universal"
SHARED_CHECK = ".shared_check"  # written by rank 0 at start-up, read by every rank, then removed
# How long a rank waits to see a file another node has just written (NFS caches directory lookups for
# seconds); TOKENFORMER_DIST_FS_WAIT_S overrides it.
FS_WAIT_S = 30.0


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    f = checkpoints_dir(run_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoints_dir(run_dir) / tag / META).is_file() else None


def latest_checkpoint(run_dir: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """(tag, meta) of the run dir's latest complete checkpoint, (None, None) when it has none."""
    tag = latest_tag(run_dir)
    return (tag, read_meta(checkpoints_dir(run_dir) / tag)) if tag else (None, None)


def fs_wait_s() -> float:
    return float(os.environ.get("TOKENFORMER_DIST_FS_WAIT_S", FS_WAIT_S))


def _seen_within(sees: Callable[[], bool], wait_s: float) -> bool:
    """Whether `sees()` becomes true within `wait_s` seconds (polled; OSError counts as not yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if sees():
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _require_seen_on_every_rank(sees: Callable[[], bool], problem: str) -> None:
    """Collective: every rank polls `sees` for up to `fs_wait_s()`; if one never sees it, every rank stops with
    a LaunchError naming that rank, its node and `problem`."""
    wait_s = fs_wait_s()
    comm.require_on_every_rank(lambda: None if _seen_within(sees, wait_s) else problem)


def check_run_dir_shared(run_dir: str | Path) -> None:
    """Collective, at start-up: stop (LaunchError, one line naming the node and the path) unless every rank
    sees the run directory rank 0 sees. Rank 0 writes a fresh nonce into it; every rank must read that nonce
    back within `fs_wait_s()`. A node-local run directory would leave the other nodes' checkpoint shards in
    `<tag>.partial` and, after a requeue, start those nodes at step 0 while node 0 resumed."""
    run_dir = Path(run_dir)

    def write_nonce() -> tuple[str, str]:
        nonce = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / SHARED_CHECK, nonce)
        return nonce, socket.gethostname()

    nonce, host0 = comm.decide_on_rank0(write_nonce)
    try:
        _require_seen_on_every_rank(
            lambda: (run_dir / SHARED_CHECK).read_text() == nonce,
            f"--run-dir {run_dir} is not the directory rank 0 (node {host0}) uses: the file {SHARED_CHECK} rank 0 "
            f"wrote there is not visible here after {fs_wait_s():g} s; put the run directory on a filesystem "
            f"that every node mounts at the same path")
    finally:
        comm.decide_on_rank0(lambda: (run_dir / SHARED_CHECK).unlink(missing_ok=True))


def require_checkpoint_visible(ckpt_dir: Path, meta: dict[str, Any]) -> None:
    """Collective: every rank must read the same meta.json in `ckpt_dir` that rank 0 read (else one line)."""
    _require_seen_on_every_rank(lambda: read_meta(ckpt_dir) == meta,
                                f"{ckpt_dir}: rank 0 resumes from this checkpoint, but its {META} is missing or "
                                f"differs here (a stale view of the run directory?)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir -> its latest complete checkpoint; a checkpoint dir or a weights dir -> itself."""
    p = Path(path)
    if (p / META).is_file() or is_weights_dir(p):
        return p
    if (p / "checkpoints").is_dir():
        tag = latest_tag(p)
        if tag is None:
            raise ValueError(f"{p}: run directory has no complete checkpoint (no valid checkpoints/{LATEST})")
        return checkpoints_dir(p) / tag
    raise ValueError(f"{p}: not a run directory, a trainer checkpoint (with {META}) or a weights dir "
                     f"(with manifest.json)")


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / META).read_text())


def read_config(ckpt_dir: str | Path) -> Config:
    """The resolved config saved with a checkpoint or weights dir (a run dir resolves to its latest)."""
    return load_config(resolve_checkpoint(ckpt_dir) / CONFIG)


def open_checkpoint(path: str | Path, tp: int | None = None) -> tuple[Path, Config, int]:
    """(checkpoint dir, its config, its TP degree) for a run dir, checkpoint or weights dir that is read at
    tensor-parallel degree `tp` (None: the degree it was written at). A different degree is refused: the
    per-rank files must be resharded first (tools/expand_tokens.py with --grow 1)."""
    ckpt = resolve_checkpoint(path)
    written = checkpoint_tp(ckpt)
    if tp is not None and tp != written:
        raise ValueError(f"{ckpt}: written at tp={written}, tp={tp} requested; reshard it first with "
                         f"`python tools/expand_tokens.py --ckpt {path} --out DIR --tp {tp} --grow 1`")
    return ckpt, read_config(ckpt), written


def check_rank_files(ckpt_dir: Path, tp: int) -> None:
    """A one-line error naming the file when a rank's weights file is missing, truncated or not safetensors."""
    for r in range(tp):
        path = rank_file(ckpt_dir, r)
        if not path.is_file():
            raise ValueError(f"{path}: missing checkpoint shard (the checkpoint was written at tp={tp})")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")  # safetensors: u64 LE header size, JSON header
                header = json.loads(f.read(header_len)) if 0 < header_len < size else None
            end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                       default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            end = None
        if end is None:
            raise ValueError(f"{path}: not a safetensors file, or its header is truncated")
        if size < end:
            raise ValueError(f"{path}: truncated checkpoint shard ({size} of {end} bytes)")


def weight_specs(ckpt_dir: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of every weight of a checkpoint or weights dir, from the safetensors headers only,
    in the order `iter_weight_blocks` yields them."""
    d = resolve_checkpoint(ckpt_dir)
    tp = checkpoint_tp(d)
    check_rank_files(d, tp)
    with safe_open(str(rank_file(d, 0)), framework="pt") as f:
        return [(name, full_shape(name, tuple(f.get_slice(name).get_shape()), tp)) for name in sorted(f.keys())]


def iter_weight_blocks(ckpt_dir: str | Path) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(name, row blocks) of every weight of a checkpoint or weights dir, one tensor at a time.

    The one reader of per-TP-rank weights: evaluation and generation at any TP (`load_weights_resharded`),
    the expansion tool and the HF export read through it. A TP-sharded tensor comes as its per-rank blocks in
    rank order (`sharding.join_parts` makes them the full tensor); a replicated one (and a tau buffer) as
    [rank 0's copy]. Blocks are read from memory-mapped safetensors files, so memory is bounded by one tensor.
    Names come in a fixed (sorted) order.
    """
    d = resolve_checkpoint(ckpt_dir)
    tp = checkpoint_tp(d)
    check_rank_files(d, tp)
    handles = [safe_open(str(rank_file(d, r)), framework="pt") for r in range(tp)]
    for name in sorted(handles[0].keys()):
        yield name, [h.get_tensor(name) for h in (handles if is_tp_sharded(name) else handles[:1])]


def iter_full_weights(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) fp32 tensors by state_dict name, one at a time (see `iter_weight_blocks`)."""
    for name, blocks in iter_weight_blocks(ckpt_dir):
        yield name, join_parts(name, blocks).float()


@torch.no_grad()
def load_weights_resharded(model: torch.nn.Module, path: str | Path) -> None:
    """Fill `model` (a TokenFormer on one device, or one TP rank's part of it) from a run dir, checkpoint or
    weights dir written at ANY tensor-parallel degree and ZeRO stage (the per-TP-rank fp32 master weights).

    At the degree it was written at, this rank's file is read (`weights.load_weights`). At another degree,
    every tensor is read whole, one at a time (`iter_full_weights`), and this rank keeps its part of it by the
    sharding table: memory is the model plus one full tensor.
    """
    regions = getattr(model, "tp", None)  # the model's TP regions (model/mappings.py); none: one device
    tp, tp_rank = (regions.size, regions.rank) if regions is not None else (1, 0)
    src = resolve_checkpoint(path)
    if checkpoint_tp(src) == tp:
        load_weights(model, src)
        return
    state = model.state_dict()
    seen = set()
    for name, full in iter_full_weights(src):
        if name not in state:
            raise ValueError(f"{src}: weights do not match the model (unexpected {name})")
        part = local_part(name, full, tp_rank, tp)
        if part.shape != state[name].shape:
            raise ValueError(f"{src}: {name} has shape {tuple(full.shape)}, the model at tp={tp} expects "
                             f"{full_shape(name, tuple(state[name].shape), tp)}")
        state[name].copy_(part)
        seen.add(name)
    missing = sorted(set(state) - seen)
    if missing:
        raise ValueError(f"{src}: weights do not match the model (missing {missing[:5]})")


def _full_fp32_param(p: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's whole fp32 master copy of `p` (collective over the DP group under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return (p.detach() if full is None else full).float()


def rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU generator; on GPU also this device's generator and megatron's CUDA RNG tracker states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state.update({f"tracker.{name}": t.cpu() for name, t in get_cuda_rng_tracker().get_states().items()})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        tracker = {k.removeprefix("tracker."): v for k, v in state.items() if k.startswith("tracker.")}
        if tracker:
            get_cuda_rng_tracker().set_states(tracker)


def save_checkpoint(engine: Any, run_dir: str | Path, step: int, cfg: Config, info: Any,
                    meta_extra: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls. Writes RUN/checkpoints/<tag>, then moves `latest` to it."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    final, partial = root / tag, root / f"{tag}.partial"
    if comm.decide_on_rank0(lambda: latest_tag(run_dir) == tag):
        return final  # already saved (e.g. a run that resumed at its last step); rank 0 decides for all
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (partial, final):
            shutil.rmtree(stale, ignore_errors=True)
    comm.barrier()
    engine.save_checkpoint(str(root), tag=partial.name,
                           client_state={"universal_checkpoint_info": universal_checkpoint_info(
                               cfg.model.vocab_size)}, save_latest=False)
    # fp32 master weights per TP rank: every rank joins the gathers, DP rank 0 writes.
    module = engine.module
    tensors = {name: _full_fp32_param(p) for name, p in module.named_parameters()}
    tensors.update({name: b.detach().float() for name, b in module.named_buffers()})
    ordered = {name: tensors[name] for name in module.state_dict()}
    if info.dp_rank == 0:
        with atomic_path(rank_file(partial, info.tp_rank)) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in ordered.items()}, str(tmp))
    save_file(rng_state(), str(partial / f"rng_rank{info.rank:04d}.safetensors"))
    _fault_point("save", step, info.rank)
    comm.barrier()
    if info.is_main:
        (partial / CONFIG).write_text(config_yaml(cfg))
        meta = {"step": step, "tp": info.tp_size, "dp": info.dp_size, "world_size": info.world_size,
                "zero_stage": cfg.parallel.zero_stage, **meta_extra}
        atomic_write_text(partial / META, json.dumps(meta, indent=1))
        os.replace(partial, final)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep_last, keep=tag)
    comm.barrier()
    return final


def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for the reliability tests: TOKENFORMER_DIST_FAULT=kill_during_save:STEP:RANK makes
    that rank SIGKILL itself after its checkpoint files are written and before the checkpoint is committed."""
    spec = os.environ.get("TOKENFORMER_DIST_FAULT", "")
    if spec == f"kill_during_{where}:{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".partial"))
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(root / old, ignore_errors=True)


def convert_to_universal(ckpt_dir: Path, out: Path, workers: int = 1) -> Path:
    """Run DeepSpeed's ds_to_universal on a trainer checkpoint into `out` (written as <out>.tmp, renamed), with
    `workers` extract and merge processes."""
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{ckpt_dir}: ds_to_universal failed: {tail[0]}")  # a damaged checkpoint: exit 2
    os.replace(tmp, out)
    return out


def mark_universal_restore(module: torch.nn.Module, tp_group: Any, tp_size: int) -> None:
    """Before deepspeed.initialize, for a resume through a universal checkpoint: tag every parameter with the
    TP block it loads (sharding.universal_restore_meta says why ZeRO 3 needs it), and hand DeepSpeed the TP
    group that ZeRO 3's universal load asks its own `groups` module for (runtime/zero/stage3.py
    `load_hp_checkpoint_state`: `groups.get_tensor_model_parallel_group()`, which only DeepSpeed's AutoTP sets;
    elsewhere in DeepSpeed 0.19.8 it is read only for AutoEP, which this model does not use)."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.utils import groups

    for name, p in module.named_parameters():
        setattr(p, DS_AUTOTP_UC_META, universal_restore_meta(name, tuple(p.shape), tp_size))
    groups._TENSOR_MODEL_PARALLEL_GROUP = tp_group


def load_engine_checkpoint(engine: Any, load_dir: Path, universal: bool) -> None:
    """engine.load_checkpoint of a trainer checkpoint or, after a DP change, of its universal form; then undo
    what DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong (runtime/zero/stage3.py
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`):
      - it assigns ONE `step` tensor object to every flat parameter group (`state[fp32_param]['step'] =
        state_step`); torch's AdamW increments it in place once per group, so with two groups (decay, no
        decay) the bias correction ran at twice the step rate;
      - it copies group 0's hyperparameters into every group, giving the no-decay group (final LayerNorm)
        weight decay.
    Both are no-ops for ZeRO 1/2 and same-DP resumes; tests/test_train.py resumes ZeRO 3 at another DP size."""
    inner = getattr(engine.optimizer, "optimizer", None)  # the torch AdamW inside DeepSpeed's wrapper
    decays = [g["weight_decay"] for g in inner.param_groups] if inner is not None else []
    engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_lr_scheduler_states=False)
    if not universal or inner is None:
        return
    for group, decay in zip(inner.param_groups, decays, strict=True):
        group["weight_decay"] = decay
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def ensure_universal(ckpt_dir: Path) -> Path:
    """Collective: convert a checkpoint to DeepSpeed's universal format once, cached as <ckpt>/universal.
    Rank 0 converts while the other ranks wait (bounded by parallel.dist_timeout_minutes; docs/training.md
    has the conversion time per GB); a failed conversion stops every rank with rank 0's error."""
    out = ckpt_dir / UNIVERSAL
    comm.decide_on_rank0(lambda: out if out.is_dir() else convert_to_universal(ckpt_dir, out))
    _require_seen_on_every_rank(out.is_dir, f"{out}: the universal checkpoint rank 0 wrote is not visible here")
    return out


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    f = ckpt_dir / f"rng_rank{rank:04d}.safetensors"
    if not f.is_file():
        return False
    set_rng_state(load_file(str(f)))
    return True


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, ckpt_dir: Path, tp_rank: int) -> None:
    """Buffers (tau) from the checkpoint's weights file: DeepSpeed's universal load restores parameters only,
    and tau may differ from its config default after a lossless expansion."""
    with safe_open(str(rank_file(ckpt_dir, tp_rank if rank_file(ckpt_dir, tp_rank).is_file() else 0)),
                   framework="pt") as f:
        saved = set(module.state_dict())  # persistent buffers only (rotary frequencies are not saved)
        for name, buf in module.named_buffers():
            if name in saved:
                buf.copy_(f.get_tensor(name))
