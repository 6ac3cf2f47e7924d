"""The TP degree evaluation and generation run at (tokenformer_dist/inference/launch.py), without processes: the
launch's world size and the checkpoint's TP decide it; a --tp the launch or the model cannot take is a one-line error.
The end-to-end checks (TP 1 from TP-2 checkpoints, resharding under torchrun) are in tests/test_train.py and
tests/test_use_model.py."""

import pytest

from tests.dist import REPO
from tokenformer_dist.config import load_config
from tokenformer_dist.inference.launch import choose_tp, launch_world_size

TINY = load_config(REPO / "configs" / "tiny.yaml")  # token counts 64 / 64 / 256, vocabulary 8192


@pytest.mark.parametrize(("requested", "checkpoint_tp", "world", "want"), [
    (None, 2, 1, 1),  # plain python: TP 1 whatever the checkpoint was trained at
    (None, 2, 2, 2),  # torchrun 2 on a TP-2 checkpoint: read as written
    (None, 1, 2, 1),  # torchrun 2 on a TP-1 checkpoint: TP 1 x DP 2
    (None, 8, 4, 4),  # torchrun 4 on a TP-8 checkpoint: the largest degree dividing both
    (None, 2, 6, 2),
    (2, 1, 2, 2),  # an explicit --tp that differs from the checkpoint's: resharded on load
    (1, 2, 2, 1),
])
def test_choose_tp(requested, checkpoint_tp, world, want):
    assert choose_tp(requested, checkpoint_tp, TINY, world) == want


@pytest.mark.parametrize(("requested", "world", "message"), [
    (2, 1, "does not divide the 1 process(es) of this launch; plain `python` runs one process, at --tp 1"),
    (4, 2, "does not divide the 2 process(es) of this launch; valid: a divisor of 2"),
    (3, 3, "model.qkv_tokens=64 does not split over 3 tensor-parallel ranks; valid --tp for this model and "
           "launch: 1"),
    (0, 1, "must be a positive integer"),
])
def test_choose_tp_refuses_in_one_line(requested, world, message):
    with pytest.raises(ValueError, match="^--tp") as err:
        choose_tp(requested, 2, TINY, world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_launch_world_size(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert launch_world_size() == 1
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launch_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun inside an allocation: its own world wins
    assert launch_world_size() == 2
