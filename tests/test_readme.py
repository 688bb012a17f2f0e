"""The README's Python snippets run as written (zetascale's README examples do not), and each one
computes what its comments promise: every block has an expectation below, found by a marker
string in its code, and a block without one fails the test."""

import math
import re
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start(ns: dict) -> None:
    """Block 1: ``y`` (1, 16, 64); ``tokens`` (2, 32) ids of the 256-token vocabulary; ``loss`` a scalar
    next-token cross-entropy, near ln 256 for an untrained model (its logits are nearly uniform)."""
    assert ns["y"].shape == (1, 16, 64)
    tokens = np.array(ns["tokens"])
    assert tokens.shape == (2, 32) and tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 256
    assert ns["loss"].shape == () and abs(float(ns["loss"]) - math.log(256)) < 1.0


def pretrained_embeddings(ns: dict) -> None:
    """Block 2: ``emb`` (2, 384) with unit rows, so ``(emb[0] * emb[1]).sum()`` is their cosine similarity."""
    emb = np.array(ns["emb"], dtype=np.float64)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def coreml_export(ns: dict) -> None:
    """Block 3: the saved package runs in numpy within "about 1e-3 (fp16)" of MLX, and lint finds nothing."""
    from mlx_zeta.converters import coreml

    assert np.abs(ns["y"] - np.array(ns["ff"](ns["x"]))).max() < 1e-2
    assert coreml.lint(str(ns["path"])) == []


def coreai_export(ns: dict) -> None:
    """Block 4: Apple's runtime ran the saved bundle within "about 1e-7 (float32)" of MLX."""
    assert ns["y"].shape == (2, 32) and np.abs(ns["y"] - np.array(ns["ff"](ns["x"]))).max() < 1e-5


def coreai_missing() -> str:
    """Why a Core AI block cannot run here ("" when it can): coreai-core's wheels exist for Linux x86_64
    and macOS arm64, Python >= 3.11 only."""
    from mlx_zeta.converters.coreai import available

    return available()[1]


def emulated_kernel(ns: dict) -> None:
    """Block 5: the emulated fused kernel equals mx.fast's attention to "~1e-7"."""
    ref = ns["attend"](ns["q"], ns["k"], ns["v"], mask=ns["keep"])
    assert ns["fused"].shape == (1, 4, 16, 64) and mx.abs(ns["fused"] - ref).max().item() < 1e-5


def run_models(ns: dict) -> None:
    """Block 6: ``answer`` is transformers' greedy answer to the chat (the tiny Qwen3 stands in for the
    converted folder), and the sampled stream ended after at most 16 tokens with a finish reason."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained("qwen3-tiny").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained("qwen3-tiny")
    ids = hf_tok.apply_chat_template(ns["chat"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):]
    assert ns["answer"] == hf_tok.decode(out, skip_special_tokens=True)
    assert ns["r"].finish_reason in ("stop", "length") and ns["r"].generation_tokens <= 16


def fine_tune(ns: dict) -> None:
    """Block 7: QLoRA halves the validation loss or better, the base stays 4-bit and frozen (only the
    adapters train), the adapters are on disk, and the greedy answer has the trained form."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    (start, first), (end, last) = ns["result"]["val_losses"][0], ns["result"]["val_losses"][-1]
    assert (start, end) == (0, 40) and last < first / 2, ns["result"]["val_losses"]
    model = ns["model"]
    assert all(".lora_" in k for k, _ in tree_flatten(model.trainable_parameters()))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert {"adapters.safetensors", "adapter_config.json"} <= {p.name for p in Path("adapters").iterdir()}
    answer = mlx_zeta.generate(model, ns["tokenizer"], ns["question"], max_tokens=12)
    assert re.fullmatch(r"\d plus \d is \d+\.", answer.strip()), answer


def native_kernels(ns: dict) -> None:
    """The native-kernels block: every kernel's path, and "cpu" exactly where the extension is built."""
    from mlx_zeta.kernels import cpu

    assert ns["paths"]["ternary_matmul"] == ("cpu" if cpu.available() else "reference")
    assert ns["paths"]["affine_matmul"] == ("cpu" if cpu.available() else "mlx")
    assert ns["isa"] == (cpu.supported_isas()[0] if cpu.available() else None)
    assert cpu.num_threads() in (0, 2)
    if cpu.available():
        cpu.set_num_threads(0)


def make_qwen3_tiny() -> None:
    """The folder blocks 5 and 6 load, made in the test's working directory (random weights, a real tokenizer)."""
    from lm_tiny import make_qwen3

    if not Path("qwen3-tiny").exists():
        make_qwen3(Path("qwen3-tiny"))


SETUPS = {'load("qwen3-tiny")': make_qwen3_tiny}  # marker -> what the block needs on disk first
UNLESS = {"coreai.export_coreai(": coreai_missing}  # marker -> why the block cannot run here ("": it can)

EXPECTATIONS = {  # a string only that block's code holds -> what the block must have computed
    "AutoregressiveWrapper(lm)": quick_start,
    "from_pretrained(path)": pretrained_embeddings,
    "export_coreml(": coreml_export,
    "coreai.export_coreai(": coreai_export,
    'use_kernels("emulate")': emulated_kernel,
    'mlx_zeta.load("qwen3-tiny")': run_models,
    "train(model, tokenizer": fine_tune,
    "kernels.info()[\"kernels\"]": native_kernels,
}


def test_readme_python_blocks_run_and_compute_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python blocks"
    for i, code in enumerate(blocks):
        found = [check for marker, check in EXPECTATIONS.items() if marker in code]
        assert len(found) == 1, f"README python block {i} matches {len(found)} expectations; give it one in EXPECTATIONS"
        if any(marker in code and why() for marker, why in UNLESS.items()):
            continue  # e.g. no coreai-core wheel for this platform: that block's own tests skip too
        for marker, setup in SETUPS.items():
            if marker in code:
                setup()
        namespace: dict = {}
        exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
        found[0](namespace)
    assert len(blocks) == len(EXPECTATIONS), "an expectation in EXPECTATIONS matches no README block"
