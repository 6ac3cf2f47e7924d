"""What one training step of the model asks of the device: operations launched and elementwise bytes moved.

Two counts of one forward + backward of the plain `TokenFormer` (TP 1, micro-batch b, the trainer's dtype):

  eager     every aten op dispatched (a TorchDispatchMode below autograd), as eager PyTorch launches them;
            each costs ~5–20 µs of host time, so a host-bound step's time is roughly their number × that.
            Runs on the meta device (shapes only, seconds) or on a real device.
  compiled  the model regionally compiled as the trainer compiles it (model/compile.py), run for real on
            the CPU under torch.profiler with Inductor's per-kernel profiling on: every generated kernel and
            every extern call (matmuls, attention) inside a compiled graph, plus the aten ops dispatched
            outside the compiled regions (embedding, ...).

Elementwise bytes are what the non-matmul work reads and writes: eager, the tensor inputs and outputs of
every op that is neither a matmul/attention nor a view; compiled, Inductor's own count of the buffers each
generated (fused) kernel reads and writes (`GraphLowering.count_bytes`), times how often its graph ran, plus
the few ops outside the compiled regions (the embedding, the tied weight's two gradients summed) from their
recorded input shapes (`_event_bytes`).

The counts are of the model's forward and backward only (not the optimizer step, not DeepSpeed's hooks).
bench/bench_step_kernels.py prints them; the planner (plan.py) charges host time per launched op from them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokenformer_dist.config import ModelConfig

aten = torch.ops.aten
# ops whose time is matmul FLOPs, not memory traffic (the extern kernels of a compiled graph)
MATMUL_OPS = frozenset({
    aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.matmul.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_cudnn_attention_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
})


@dataclass(frozen=True)
class GraphLaunches:
    """One compiled graph in a step: how often it ran, and per run its launches and elementwise bytes."""

    calls: int
    launches: int
    elementwise_bytes: int


@dataclass
class StepCensus:
    """One forward + backward: `launches` (eager: aten ops; compiled: kernels + ops outside the regions), of
    which `matmuls` are matmul/attention calls, and the bytes the rest move. Compiled only: `graphs` (per
    compiled graph) and `outside` (ops dispatched outside the compiled regions, by name)."""

    launches: int
    matmuls: int
    elementwise_bytes: int
    views: int = 0  # launches that are views (no kernel, host time only)
    by_name: Counter = field(default_factory=Counter)
    graphs: list[GraphLaunches] = field(default_factory=list)
    outside: Counter = field(default_factory=Counter)

    def per_layer(self, n_layers: int) -> tuple[float, float]:
        """Compiled: (launches per block — the graphs that run once per layer, and the ops outside the regions
        that come n_layers at a time —, launches outside the blocks)."""
        block = sum(g.launches for g in self.graphs if g.calls % n_layers == 0) * n_layers
        block += sum(n - n % n_layers for n in self.outside.values())
        return block / n_layers, self.launches - block


def _is_view(func: torch._ops.OpOverload) -> bool:
    return bool(func.is_view) or func.overloadpacket in (aten.view, aten._unsafe_view, aten.reshape)


def _tensor_bytes(tree: object) -> int:
    seen: dict[int, int] = {}
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.census = StepCensus(0, 0, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        c = self.census
        c.launches += 1
        c.by_name[str(func.overloadpacket.__name__)] += 1
        if func in MATMUL_OPS:
            c.matmuls += 1
        elif _is_view(func):
            c.views += 1
        else:
            c.elementwise_bytes += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        return out


def _model(m: ModelConfig, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from tokenformer_dist.model.tokenformer import TokenFormer

    with torch.device(device):  # on the meta device: shapes only, so no init to draw
        model = TokenFormer(m, seed=1, init_weights=device != "meta")
    return model.to(dtype).train()


def _batch(m: ModelConfig, micro_batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, m.vocab_size, (micro_batch, m.seq_len + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def eager_census(m: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.bfloat16,
                 device: str = "meta") -> StepCensus:
    """aten ops one eager forward + backward dispatches, and the elementwise bytes they move. On the meta
    device attention takes SDPA's math path (a dozen ops per layer more than a GPU's fused kernel)."""
    model = _model(m, dtype, device)
    inputs, labels = _batch(m, micro_batch, device)
    counter = _OpCounter()
    with counter:
        model(inputs, labels).backward()
    return counter.census


def eager_ops_per_layer(m: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(ops per block, ops outside the blocks) of one eager forward + backward, from the meta-device census
    of a 1-layer and a 2-layer model of these dimensions."""
    one, two = (eager_census(replace(m, n_layers=n), micro_batch, dtype).launches for n in (1, 2))
    return two - one, 2 * one - two


class _GraphMetrics(logging.Handler):
    """Collects Inductor's per-graph "Graph Metrics" log records: the bytes each generated kernel moves."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.graphs: list[int] = []  # per compiled graph, in compile order: bytes of its generated kernels

    def emit(self, record: logging.LogRecord) -> None:
        metrics = record.args if isinstance(record.args, dict) else None
        if not metrics or "nodes_num_elem" not in metrics:
            return
        from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

        # count_bytes() reports num_bytes // 4 per scheduler node
        self.graphs.append(sum(4 * n for node, n in metrics["nodes_num_elem"]
                               if not isinstance(node, (ExternKernelSchedulerNode, NopKernelSchedulerNode))))


@contextlib.contextmanager
def _inductor_census_config() -> Iterator[_GraphMetrics]:
    """Inductor set to name every CPU kernel in the profiler and to report its bytes, with an empty cache
    directory: every graph is really compiled (a cache hit skips the byte count) and still gets the cache
    key that names it in the profiler's "## Call CompiledFxGraph <key> ##" events."""
    import os
    import tempfile

    import torch._inductor.config as inductor_config

    metrics_log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    handler = _GraphMetrics()
    old_level, old_propagate = metrics_log.level, metrics_log.propagate
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    metrics_log.addHandler(handler)
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    try:
        with tempfile.TemporaryDirectory(prefix="census_inductor_") as cache, \
                inductor_config.patch({"cpp.enable_kernel_profile": True, "fx_graph_cache": True}):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            yield handler
    finally:
        metrics_log.removeHandler(handler)
        metrics_log.setLevel(old_level)
        metrics_log.propagate = old_propagate
        if old_cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache


GRAPH_CALL = "## Call CompiledFxGraph"
_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1}


def _graph_key(name: str) -> str:
    return name[len(GRAPH_CALL):].strip(" #")


def _event_bytes(e) -> int:
    """Bytes an op outside the compiled regions moves, from its recorded input shapes and dtypes: its inputs
    read and an output the size of its first input written (what the ops found there do: `add_` summing the
    tied weight's two gradients, `ones_like` seeding the loss gradient); views move nothing."""
    sizes = []
    for shape, dtype in zip(e.input_shapes or [], getattr(e, "input_dtypes", None) or [], strict=False):
        if isinstance(shape, list) and shape and all(isinstance(v, int) for v in shape):
            sizes.append(math.prod(shape) * _DTYPE_BYTES.get(dtype, 4))
    return sum(sizes) + (sizes[0] if sizes else 0)


def _classify(events) -> tuple[list, list, list[str]]:
    """(kernels inside compiled graphs, aten ops dispatched outside them, graph keys in first-call order):
    an event directly inside a graph call is one of its kernels (generated or extern); an aten op with no
    aten op or graph call above it ran eagerly."""
    kernels, outside, order = [], [], []
    for e in events:
        if e.name.startswith(GRAPH_CALL):
            if _graph_key(e.name) not in order:
                order.append(_graph_key(e.name))
            continue
        parent = e.cpu_parent
        while parent is not None and not (parent.name.startswith(GRAPH_CALL) or parent.name.startswith("aten::")):
            parent = parent.cpu_parent
        if parent is not None and parent.name.startswith(GRAPH_CALL):
            if parent is e.cpu_parent:
                kernels.append(e)
        elif parent is None and e.name.startswith("aten::"):
            outside.append(e)
    return kernels, outside, order


_MATMUL_NAMES = frozenset(op.__name__.split(".")[0] for op in MATMUL_OPS)


def compiled_census(m: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.bfloat16) -> StepCensus:
    """Kernels one compiled forward + backward launches on the CPU (see the module docstring), and the bytes
    its kernels and the ops outside the regions move. Compiles the model (minutes at owt_124m on 2 cores)."""
    from torch.profiler import ProfilerActivity, profile

    from tokenformer_dist.model.compile import compile_model

    model = _model(m, dtype, "cpu")
    inputs, labels = _batch(m, micro_batch, "cpu")
    with _inductor_census_config() as graph_bytes:
        compile_model(model)
        with profile(activities=[ProfilerActivity.CPU]) as first:  # compiles every graph, in call order
            model(inputs, labels).backward()
        compile_order = _classify(first.events())[2]
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(inputs, labels).backward()
    if len(compile_order) != len(graph_bytes.graphs):
        raise RuntimeError(f"census: {len(graph_bytes.graphs)} graphs compiled but {len(compile_order)} called")
    events = prof.events()
    kernels, outside, _ = _classify(events)
    bytes_of = dict(zip(compile_order, graph_bytes.graphs, strict=True))
    calls = Counter(_graph_key(e.name) for e in events if e.name.startswith(GRAPH_CALL))
    launches_of = Counter(_graph_key(e.cpu_parent.name) for e in kernels)
    census = StepCensus(len(kernels) + len(outside), 0, sum(bytes_of[key] * n for key, n in calls.items()))
    census.graphs = [GraphLaunches(n, launches_of[key] // n, bytes_of[key]) for key, n in calls.items()]
    for e in kernels + outside:
        name = e.name.removeprefix("aten::")
        census.by_name[name if e.name.startswith("aten::") else "(generated kernel)"] += 1
        if name in _MATMUL_NAMES:
            census.matmuls += 1
    for e in outside:
        census.outside[e.name.removeprefix("aten::")] += 1
        if _is_view_name(e.name.removeprefix("aten::")):
            census.views += 1
        else:
            census.elementwise_bytes += _event_bytes(e)
    return census


def _is_view_name(name: str) -> bool:
    op = getattr(aten, name, None)
    return op is not None and any(_is_view(getattr(op, o)) for o in op.overloads())
