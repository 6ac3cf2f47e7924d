"""Stand-in for the trainer in Slurm jobs that test slurm/common.sh itself (tests/test_slurm.py), started by
a PYTHON wrapper in place of `python -m tokenformer_dist.train`:

    slurm_probe.py gpus   one JSON line: node, Slurm rank, LOCAL_RANK as the trainer derives it, the visible
                          GPUs and the one the trainer's rule (launch.device_index) picks; exit 0
    slurm_probe.py usr1   ready at once (no torch import): exits 75 on SIGUSR1 or SIGTERM, as the trainer
                          does after its checkpoint; 0 after 600 s
"""

import json
import os
import signal
import sys
import time


def gpus() -> int:
    from tokenformer_dist.distributed.launch import device_index, env_from_launcher

    env_from_launcher()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    local_rank = int(os.environ["LOCAL_RANK"])
    picked = visible[device_index(local_rank, len(visible))] if visible else None
    print(json.dumps({"node": os.environ["SLURMD_NODENAME"], "rank": int(os.environ["RANK"]),
                      "local_rank": local_rank, "slurm_localid": int(os.environ["SLURM_LOCALID"]),
                      "visible": visible, "gpu": picked}), flush=True)
    return 0


def usr1() -> int:
    def stop(signum: int, frame: object) -> None:
        print(f"probe rank {os.environ.get('SLURM_PROCID')}: got {signal.Signals(signum).name}", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"probe rank {os.environ.get('SLURM_PROCID')}: ready", flush=True)
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit({"gpus": gpus, "usr1": usr1}[sys.argv[1]]())
