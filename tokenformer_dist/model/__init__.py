from tokenformer_dist.model.pattention import Pattention, ShardedPattention, pattention
from tokenformer_dist.model.tokenformer import TokenFormer

__all__ = ["Pattention", "ShardedPattention", "TokenFormer", "pattention"]
