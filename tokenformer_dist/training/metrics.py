"""Training metrics: peak device FLOP/s (for MFU, with model/flops.py's FLOPs per token) and the
metrics.jsonl + TensorBoard writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tokenformer_dist.atomic import atomic_write_text

# Dense bf16 peak FLOP/s by device-name substring (first match wins), from the vendors' data sheets.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A10G", 70e12), ("L40S", 362e12), ("L4", 121e12), ("V100", 125e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Per-device dense bf16 peak, or None (CPU, unknown GPU): then report achieved FLOP/s only."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def host_memory_bytes(field: str = "VmRSS") -> int:
    """One memory figure of this process from /proc/self/status (Linux): VmRSS now, VmHWM its peak."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak_host_memory() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class MetricsWriter:
    """Rank-0 writer of RUN/metrics.jsonl (one JSON object per logged step) and RUN/tb (TensorBoard)."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.is_file():  # drop records past the checkpoint we resume from (they will be redone)
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and
                    json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._file = self.path.open("a")
        self._tb = SummaryWriter(str(Path(run_dir) / "tb"),
                                 purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}",
                                    value, step)
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()
