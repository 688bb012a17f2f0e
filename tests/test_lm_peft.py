"""LoRA/DoRA adapters in PEFT's layout (``mlx_zeta.lm.adapters_hf``): the Hugging Face module map of
each converter (``hf_linear_parts``) against transformers' own modules and weights, our adapters
exported for ``peft.PeftModel`` and PEFT's adapters imported, logits compared with transformers +
peft 0.21.2 in float32."""

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mlx_zeta.converters import from_pretrained, get_architecture  # noqa: E402

TOL = 2e-5


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def model_args(model):
    arch = get_architecture(model.pretrained.model_type)
    return arch, arch.ModelArgs.from_dict(dict(model.pretrained.config))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_lm):
    """(name, folder, our float32 model, transformers model) of a tiny checkpoint."""
    folder = tiny_lm(request.param)
    return request.param, folder, from_pretrained(folder, dtype="float32"), hf_model(folder)


# --------------------------------------------------------------------------- the module map


def test_hf_linear_parts_name_every_hf_linear_and_the_rows_sanitize_puts_there(pair):
    """Law: for each part, rows ``ours_rows`` of our sanitized weight are rows ``hf_rows`` of the
    transformers module's weight (``(in, out)`` transposed for Conv1D); the parts name every Linear /
    Conv1D of the transformers model but the LM head, and cover each of our Linears' rows once."""
    from transformers.pytorch_utils import Conv1D

    name, _, ours, theirs = pair
    arch, args = model_args(ours)
    parts = arch.hf_linear_parts(args)
    modules = dict(theirs.named_modules())
    linear = {n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D)) and n != "lm_head"}
    assert {p.hf for p in parts} == linear
    flat = dict(ours.named_modules())
    covered = {}
    for p in parts:
        hf = modules[p.hf]
        assert p.transposed == isinstance(hf, Conv1D)
        w = hf.weight.detach().numpy()
        w = w.T if p.transposed else w
        (a, b), (c, d) = p.ours_rows, p.hf_rows
        np.testing.assert_array_equal(np.array(flat[p.ours].weight)[a:b], w[c:d])
        covered.setdefault(p.ours, []).append((a, b))
    for path, rows in covered.items():
        rows.sort()
        assert rows[0][0] == 0 and rows[-1][1] == flat[path].weight.shape[0], path
        assert all(x[1] == y[0] for x, y in zip(rows, rows[1:])), path
