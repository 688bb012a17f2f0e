"""Model classes, one file per family, re-exported by name: the pretrained BERT encoder
(bert), T5 (t5), the pretrained ViT (vit), PaLM-E (palme) and the MatMul-free LM (matmulfree).
Hugging Face checkpoints load onto them through :mod:`mlx_zeta.converters`; the decoder-only
LMs are :class:`~mlx_zeta.structs.Transformer` structs."""

from mlx_zeta.models.bert import BertEmbeddings, BertEncoder, mean_pool
from mlx_zeta.models.matmulfree import MatMulFreeLM
from mlx_zeta.models.palme import PalmE
from mlx_zeta.models.t5 import T5Model
from mlx_zeta.models.vit import PretrainedViT, ViTEmbeddings

__all__ = ["BertEmbeddings", "BertEncoder", "mean_pool", "MatMulFreeLM", "PalmE", "T5Model", "PretrainedViT",
           "ViTEmbeddings"]
