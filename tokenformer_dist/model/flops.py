"""FLOPs per token of the model: the convention behind MFU and the progressive experiment's cumulative FLOPs.

  forward per token = Σ over Pattentions 2·n·(d_in + d_out)   (X·Kᵀ and Θ(·)·V)
                    + per layer 4·s·d                          (Q·Kᵀ and A·V, the FULL s×s square — the
                                                                 PaLM/Megatron convention; causal masking is
                                                                 not halved, so MFU is comparable to theirs)
                    + 2·d·V                                    (tied output layer)
  training = 3 × forward (backward = 2 × forward). Norms, softmax, rotary and the embedding lookup are free.

Read by the trainer's MFU (training/metrics.py), the planner (planning/plan.py) and the progressive
experiment's accounting.
"""

from __future__ import annotations

from tokenformer_dist.config import ModelConfig, pattention_params_per_layer


def forward_flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    s, d = seq_len or m.seq_len, m.d_model
    pattention = 2 * pattention_params_per_layer(m)  # a multiply-add per parameter per token
    attention = 4 * s * d
    return float(m.n_layers * (pattention + attention) + 2 * d * m.vocab_size)


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward); see the module docstring."""
    return 3.0 * forward_flops_per_token(m, seq_len)
