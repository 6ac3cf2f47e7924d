"""How a job is spread over processes: start-up from torchrun / Slurm and the process groups (`launch`), the
project's own collectives (`comm`), the sharding table of tensor parallelism (`sharding`), the DeepSpeed ZeRO
configuration of data parallelism (`deepspeed_config`), ports (`net`) and megatron-core's CPU shims
(`cpu_compat`). Below the model: it imports nothing of the package but the config."""
