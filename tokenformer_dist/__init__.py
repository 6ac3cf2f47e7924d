"""tokenformer-dist: distributed pretraining and progressive scaling of TokenFormer."""

import warnings

# megatron-core warns at import that Transformer Engine / Apex are absent; this project uses neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor. is deprecated")

__version__ = "0.1.0"
