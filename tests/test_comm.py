"""The collectives rule and its compute-device rule, the GPU fail-fast and the vocab check (CPU, one process)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_scripts.train_helpers import TINY
from tokenformer_dist.data import DatasetError, check_vocab
from tokenformer_dist.distributed import comm
from tokenformer_dist.distributed.launch import GPU_ENV_VARS, LaunchError, check_gpu_environment

PACKAGE = Path(__file__).resolve().parents[1] / "tokenformer_dist"
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list", "all_gather",
    "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced", "_all_gather_base", "gather",
    "gather_object", "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv",
    "isend", "irecv", "batch_isend_irecv",
}
# The only files allowed to call torch.distributed collectives besides distributed/comm.py: the model's named autograd
# collectives -- Pattention's normalizer all-reduces (mappings.py, lean.py) and the vocab-parallel cross
# entropy on an explicit group (tensor_parallel.py). megatron-core's own mappings live in megatron.
ALLOWED = {"distributed/comm.py", "model/mappings.py", "model/lean.py", "model/tensor_parallel.py"}


def _collective_calls(path: Path) -> list[str]:
    """`<alias of torch.distributed>.<collective>(...)` calls and `from torch.distributed import <collective>`."""
    tree = ast.parse(path.read_text(), str(path))
    aliases, found = {"torch.distributed"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            if node.module == "torch.distributed":
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_collectives_only_in_comm_module():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    bad = [hit for f in files if str(f.relative_to(PACKAGE)) not in ALLOWED for hit in _collective_calls(f)]
    assert not bad, f"torch.distributed collectives outside tokenformer_dist/distributed/comm.py: {bad}"
    assert _collective_calls(PACKAGE / "distributed/comm.py")  # the scanner does see calls


def test_comm_functions_return_on_the_compute_device_without_a_group():
    assert not comm.is_distributed()
    t = comm.all_reduce_sum(torch.ones(3))
    assert t.device == comm.device() and torch.equal(t, torch.ones(3))
    assert comm.any_rank(True).item() and not comm.any_rank(False).item()
    comm.barrier()


# every public function of distributed/comm.py that takes a tensor (or a flag), with a call of it; the device
# getters and barrier (no tensor) aside. A new collective in distributed/comm.py must be added here.
TENSOR_FUNCTIONS = {
    "all_reduce_sum": lambda: comm.all_reduce_sum(torch.ones(3)),
    "all_reduce_max": lambda: comm.all_reduce_max(torch.ones(3)),
    "any_rank": lambda: comm.any_rank(True),
}
# objects, not tensors: torch pickles them onto the registered device (broadcast_object passes it; under NCCL
# all_gather_object uses the current CUDA device, which init_distributed sets) -- tests/test_cluster_robustness.py
NO_TENSOR = {"set_device", "device", "is_distributed", "barrier", "broadcast_object", "all_gather_object",
             "decide_on_rank0", "require_on_every_rank"}


@pytest.fixture
def meta_compute_device():
    """The meta device registered as the compute device: on CPU the inputs' device (cpu) is then not it, as
    a host tensor is not the GPU under NCCL."""
    before = comm.device()
    comm.set_device(torch.device("meta"))
    yield torch.device("meta")
    comm.set_device(before)


@pytest.fixture(params=["no group", "world-1 gloo group"])
def group_or_none(request, tmp_path):
    if request.param == "no group":
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_comm_function_moves_its_tensor_to_the_compute_device(meta_compute_device, group_or_none):
    public = {name for name, f in vars(comm).items()
              if inspect.isfunction(f) and f.__module__ == comm.__name__ and not name.startswith("_")}
    assert public == set(TENSOR_FUNCTIONS) | NO_TENSOR, "comm.py's functions changed: update TENSOR_FUNCTIONS"
    for name, call in TENSOR_FUNCTIONS.items():
        assert call().device == meta_compute_device, name
    comm.barrier()


def test_fail_fast_when_the_job_has_gpus_but_torch_has_no_cuda(monkeypatch):
    for k in (*GPU_ENV_VARS, "TOKENFORMER_DIST_ALLOW_CPU"):
        monkeypatch.delenv(k, raising=False)
    check_gpu_environment(cuda_available=False)  # no GPU given: fine
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "a100:0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    check_gpu_environment(cuda_available=False)  # counts of 0 and an empty device list give no GPU
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")
    with pytest.raises(LaunchError, match="SLURM_JOB_GPUS=0,1.*torch.cuda is not available"):
        check_gpu_environment(cuda_available=False)
    check_gpu_environment(cuda_available=True)
    monkeypatch.setenv("TOKENFORMER_DIST_ALLOW_CPU", "1")
    check_gpu_environment(cuda_available=False)


def test_vocab_check():
    check_vocab(8192, 8192, "d")
    with pytest.raises(DatasetError, match="d: dataset vocab_size 8192.*model.vocab_size 4096"):
        check_vocab(8192, 4096, "d")


def test_trainer_cli_refuses_fake_slurm_gpus_and_a_too_small_vocab(sample_data, tmp_path, monkeypatch, capsys):
    """The real entry point (train.main, in this process: both checks fire before any process group or model
    exists) on this CPU machine: exit 2 with one line naming the cause."""
    from tokenformer_dist.training.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # restored after the test
        monkeypatch.setenv(k, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": "29999"}[k])
    for k in (*GPU_ENV_VARS, "TOKENFORMER_DIST_ALLOW_CPU"):
        monkeypatch.delenv(k, raising=False)
    argv = ["--config", TINY, "--data", str(sample_data), "--run-dir", str(tmp_path / "r"), "--tp", "1",
            "--steps", "1"]
    assert main([*argv, "--set", "model.vocab_size=4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "dataset vocab_size 8192" in err[0], err
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.cuda is not available" in err[0], err
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
