"""Where the tokenizing tasks run: in this process (`--workers 0`) or as Ray tasks (a local Ray, or an
existing cluster given by `--ray-address`).

Both runners take the same calls (put / submit / wait_one / get / close); the build never knows which one
it has. A Ray task returns its tokens to the driver through the object store and the driver writes every
file, so worker nodes only READ: each node must see the input files at the same path (a shared
filesystem). `RayRunner.check_nodes_see` checks that on every node before any task is submitted.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import data_prep
from data_prep.encode import process_unit
from data_prep.shards import build_dir
from data_prep.sources import DataError, Unit

MB = 1 << 20
MAX_RAY_TEMP_LEN = 40  # Ray's socket paths add ~65 characters; Unix sockets allow ~107
PACKAGE_DIR = Path(data_prep.__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class LocalRunner:
    """--workers 0: everything in this process (no Ray)."""

    workers = 1

    def __init__(self) -> None:
        self.results: dict[int, dict] = {}
        self.n = 0

    def put(self, obj: Any) -> Any:
        return obj

    def submit(self, unit: Unit, model_ref: Any, cfg: dict) -> int:
        ref = self.n
        self.n += 1
        self.results[ref] = process_unit(unit, model_ref, cfg)
        return ref

    def wait_one(self, refs) -> int:
        return next(iter(refs))

    def get(self, ref: int) -> dict:
        return self.results.pop(ref)

    def close(self) -> None:
        pass


def _node_sees(paths: list[str]) -> tuple[str, list[str]]:
    """Runs on one node: (the node's id, the paths it cannot see)."""
    import ray

    return ray.get_runtime_context().get_node_id(), [p for p in paths if not os.path.exists(p)]


class RayRunner:
    """One Ray task per unit. Without an address, a private local Ray (temp dir under the output)."""

    def __init__(self, workers: int | None, address: str | None, out: Path, block_bytes: int) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self.ray = ray
        self.tmp_cleanup: Path | None = None
        kwargs: dict = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if address:
            # the cluster's workers may run another checkout (or none): ship this one's data_prep with the job
            kwargs["address"] = address
            kwargs["runtime_env"] = {"py_modules": [str(PACKAGE_DIR)]}
        else:
            # the local workers inherit this environment: let them import this data_prep even where the
            # package is not installed (a plain checkout)
            pp = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(PACKAGE_DIR.parent) + (os.pathsep + pp if pp else "")
            temp = (build_dir(out) / "ray").resolve()
            if len(str(temp)) > MAX_RAY_TEMP_LEN:
                temp = Path(tempfile.mkdtemp(prefix="tfd-ray-", dir="/tmp"))
                self.tmp_cleanup = temp
                log(f"note: the output path is too long for Ray's Unix sockets; Ray's temp dir is {temp}")
            elif temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
            kwargs.update(
                address="local",
                num_cpus=workers or os.cpu_count() or 1,
                _temp_dir=str(temp),
                object_store_memory=max(256 * MB, min(2048 * MB, 8 * (workers or 2) * block_bytes)),
            )
        ray.init(**kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or cpus
        # on a cluster, spread the tasks over the nodes from the start: Ray's default packs them onto the
        # driver's node while it has free CPUs, and short tasks never reach nodes still starting workers
        self.remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD" if address else "DEFAULT")(process_unit)

    def check_nodes_see(self, paths: list[Path]) -> None:
        """Raise DataError unless every alive node with CPUs sees every path (the shared-filesystem rule)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(num_cpus=0)(_node_sees)
        nodes = [n for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        wanted = [str(p) for p in paths]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(wanted) for n in nodes]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=120)
        if len(ready) < len(refs):
            raise DataError(f"{len(refs) - len(ready)} Ray node(s) did not answer the input check within 120 s")
        by_id = {n["NodeID"]: n for n in nodes}
        for node_id, missing in self.ray.get(refs):
            if missing:
                ip = by_id.get(node_id, {}).get("NodeManagerAddress", "?")
                raise DataError(
                    f"Ray node {node_id[:12]} ({ip}) cannot see {missing[0]}: --ray-address needs the inputs "
                    "on a filesystem shared by every node, at the same path (see docs/data.md)"
                )

    def submit(self, unit: Unit, model_ref: Any, cfg: dict) -> Any:
        return self.remote.remote(unit, model_ref, cfg)

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def wait_one(self, refs) -> Any:
        done, _ = self.ray.wait(list(refs), num_returns=1)
        return done[0]

    def get(self, ref: Any) -> dict:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (DataError, ValueError)):
                raise DataError(str(cause)) from None
            raise
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                self.ray.exceptions.ObjectLostError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"a Ray task was lost after its retries ({type(e).__name__}: {first}); "
                            "the finished units are kept: rerun with --resume") from None

    def close(self) -> None:
        self.ray.shutdown()
        if self.tmp_cleanup:
            shutil.rmtree(self.tmp_cleanup, ignore_errors=True)


def make_runner(workers: int | None, address: str | None, out: Path, block_bytes: int,
                inputs: list[Path]) -> LocalRunner | RayRunner:
    if workers == 0:
        return LocalRunner()
    runner = RayRunner(workers, address, out, block_bytes)
    if address:
        try:
            runner.check_nodes_see(inputs)
        except BaseException:
            runner.close()
            raise
    return runner

