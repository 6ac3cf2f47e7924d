"""What is written to disk and read back: trainer checkpoints (`engine`: DeepSpeed's files plus the fp32 master
weights per TP rank, RNG states and meta), the sharded-weights format (`weights`), safetensors written one
tensor at a time (`safetensors_stream`) and the import of the official TokenFormer checkpoints (`official`)."""
