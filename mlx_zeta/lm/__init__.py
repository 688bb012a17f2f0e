"""Run and fine-tune language models: load a checkpoint with its tokenizer, generate and stream
text, chat, reuse prompt caches; fine-tune with LoRA / DoRA / QLoRA on JSON-lines data and move
adapters to and from PEFT (the layer above :mod:`mlx_zeta.converters`).

Needs the ``lm`` extra (``pip install 'mlx-zeta[lm]'``: ``tokenizers`` and ``jinja2``), imported
when a tokenizer is first loaded.
"""

from mlx_zeta.lm.adapters_hf import load_peft, save_peft
from mlx_zeta.lm.batch import batch_generate, batch_stream_generate
from mlx_zeta.lm.cache import PromptCache, WindowedKVCache, make_caches
from mlx_zeta.lm.cache_file import load_prompt_cache, save_prompt_cache
from mlx_zeta.lm.datasets import TextDataset, load_datasets
from mlx_zeta.lm.generate import (GenerationResponse, generate, generation_defaults, load, prompt_ids,
                                  stream_generate)
from mlx_zeta.lm.speculative import SpeculativeStats, speculative_steps
from mlx_zeta.lm.tokenizer import StreamingDetokenizer, Tokenizer, load_tokenizer
from mlx_zeta.lm.tuning import evaluate, perplexity, train
from mlx_zeta.lm import server  # the OpenAI-compatible server: server.make_app, server.serve (the serve extra)

__all__ = ["GenerationResponse", "PromptCache", "SpeculativeStats", "StreamingDetokenizer", "TextDataset",
           "Tokenizer", "WindowedKVCache", "evaluate", "load_datasets", "perplexity", "train", "batch_generate",
           "batch_stream_generate", "generate", "generation_defaults", "load",
           "load_peft", "load_prompt_cache", "load_tokenizer", "make_caches", "prompt_ids", "save_peft",
           "save_prompt_cache", "speculative_steps", "stream_generate", "server"]
