"""Malformed-input corpus, converters: bad config.json fields, bad checkpoints, a corrupt tokenizer
and interrupted writes, through ``mlx_zeta.from_pretrained`` / ``save_pretrained`` (the API) and
``mlx-zeta convert`` (the CLI). One case per distinct bad input; each must give one line naming the
file and the field or tensor at fault and what was expected, and leave nothing half-written: the
CLI's destination must not exist afterwards (``tests/badinput.py``). Before issue 15 a string
``"false"`` silently tied the embeddings, ``"1e-6"``/``null``/a missing field gave a traceback, NaN
weights loaded silently and a corrupt tokenizer.json was copied as it was.

The source is a tiny Llama built by the converter and written by save_pretrained (no download, no
transformers), copied per case and then broken.
"""

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx_zeta
import mlx.core as mx
import pytest
from badinput import api_error, cli_error

from mlx_zeta.converters import CheckpointFormatError, llama, load_state_dict
from mlx_zeta.converters.fields import ConfigError

CONFIG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
KEY = "attn_layers.layers.0.attn.to_q.weight"  # (32, 32)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = llama.build(llama.ModelArgs.from_dict(CONFIG))
    mx.eval(model.parameters())
    return mlx_zeta.save_pretrained(model, tmp_path_factory.mktemp("good") / "src", config=CONFIG)


def config_edit(**changes):
    def edit(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        for k, v in changes.items():
            if v is _DELETE:
                del config[k]
            else:
                config[k] = v
        (src / "config.json").write_text(json.dumps(config))
    return edit


_DELETE = object()


def config_text(text: str):
    return lambda src: (src / "config.json").write_text(text)


def weights_edit(change: Callable[[dict], None]):
    def edit(src: Path) -> None:
        weights = load_state_dict(src)
        change(weights)
        mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    return edit


def nan_in(weights):
    weights[KEY] = mx.array(weights[KEY])
    weights[KEY][0, :3] = float("nan")


def sharded_without_a_shard(src: Path) -> None:
    weights = load_state_dict(src)
    (src / "model.safetensors").unlink()
    mlx_zeta.converters.save_state_dict(weights, src, max_shard_bytes=20_000)
    shards = sorted(src.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()


def truncated(src: Path) -> None:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


@dataclass
class Case:
    edit: Callable[[Path], None]  # breaks a copy of the good folder
    names: Tuple[str, ...]  # what both messages must name
    pattern: Optional[str] = None
    error: type = ValueError  # the API's exception
    save: bool = False  # the API call that fails is save_pretrained (after a good load)
    patch: Optional[Callable] = None  # (monkeypatch) -> None: a failure during the write
    code: int = 2  # the CLI's exit status
    cli: bool = True  # also a bad input of mlx-zeta convert


def _disk_full_on_second_shard(monkeypatch) -> None:
    real, calls = mx.save_safetensors, []

    def save(path, arrays, metadata=None):
        calls.append(path)
        real(path, arrays, metadata=metadata)  # a complete shard lands in the staging folder ...
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(mx, "save_safetensors", save)


CASES = {
    # config.json: a wrong type for each kind of field, null, a missing field, nested entries
    "bool-field-as-string": Case(config_edit(tie_word_embeddings="false"),
                                 ("config.json", "'tie_word_embeddings'", "JSON boolean", "the string 'false'"),
                                 error=ConfigError),
    "float-field-as-string": Case(config_edit(rms_norm_eps="1e-6"),
                                  ("config.json", "'rms_norm_eps'", "finite JSON number", "'1e-6'"), error=ConfigError),
    "float-field-null": Case(config_edit(rms_norm_eps=None), ("config.json", "'rms_norm_eps'", "got null"),
                             error=ConfigError),
    "int-field-fraction": Case(config_edit(num_hidden_layers=2.5),
                               ("config.json", "'num_hidden_layers'", "JSON integer", "2.5"), error=ConfigError),
    "int-field-boolean": Case(config_edit(vocab_size=True), ("config.json", "'vocab_size'", "JSON integer", "true"),
                              error=ConfigError),
    "object-field-as-array": Case(config_edit(rope_scaling=[1, 2]), ("config.json", "'rope_scaling'", "an object"),
                                  error=ConfigError),
    "size-field-zero": Case(config_edit(num_attention_heads=0), ("config.json", "'num_attention_heads'", ">= 1"),
                            error=ConfigError),
    "required-field-missing": Case(config_edit(num_hidden_layers=_DELETE),
                                   ("config.json", "missing required field 'num_hidden_layers'"), error=ConfigError),
    "nested-entry-missing": Case(config_edit(rope_scaling={"rope_type": "linear"}),
                                 ("config.json", "rope_scaling", "'factor'"), error=ConfigError),
    "nested-entry-as-string": Case(config_edit(model_type="bitnet", quantization_config={
        "quant_method": "bitnet", "use_rms_norm": "false"}), ("config.json", "quantization_config", "'use_rms_norm'",
                                                              "JSON boolean"), error=ConfigError),
    "unknown-model-type": Case(config_edit(model_type="gpt7"), ("model_type", "'gpt7'", "supported")),
    "model-type-not-a-string": Case(config_edit(model_type=3), ("config.json", "'model_type'", "the number 3"),
                                    error=ConfigError),
    "config-invalid-json": Case(config_text('{"model_type": "llama",,}'), ("config.json", "not valid JSON")),
    "config-missing": Case(lambda src: (src / "config.json").unlink(), ("config.json",), pattern="no config.json"),
    "config-is-an-array": Case(config_text("[1, 2]"), ("config.json", "JSON object", "array of 2"),
                               error=ConfigError),
    "affine-record-bad-bits": Case(config_edit(mlx_zeta_quantization={"bits": 5, "group_size": 64}),
                                   ("config.json", "'mlx_zeta_quantization'", "bits 5"), error=ConfigError),
    "ternary-record-bad-class": Case(config_edit(mlx_zeta_ternary=[{"class": "Foo", "layers": []}]),
                                     ("config.json", "'mlx_zeta_ternary'", "entry 0", "BitLinear"), error=ConfigError),
    # checkpoints
    "weights-missing": Case(lambda src: (src / "model.safetensors").unlink(),
                            ("No weights found", "model.safetensors"), error=CheckpointFormatError),
    "weights-truncated": Case(truncated, ("model.safetensors", "truncated"), error=CheckpointFormatError),
    "weight-wrong-shape": Case(weights_edit(lambda w: w.update({KEY: mx.zeros((32, 31))})),
                               (KEY, "(32, 32)", "(32, 31)"), pattern="shape mismatches 1"),
    "weight-missing-key": Case(weights_edit(lambda w: w.pop(KEY)), (KEY,), pattern="missing keys 1"),
    "weight-extra-key": Case(weights_edit(lambda w: w.update({"extra.weight": mx.zeros((2,))})),
                             ("extra.weight",), pattern="unexpected keys 1"),
    "weight-nan": Case(weights_edit(nan_in), ("model.safetensors", KEY, "3 NaN/Inf values", "--allow-nonfinite"),
                       error=CheckpointFormatError),
    "index-names-a-missing-shard": Case(sharded_without_a_shard, ("model.safetensors.index.json", "-of-", "missing"),
                                        error=CheckpointFormatError),
    # tokenizer files (copied by save_pretrained, so checked there)
    "tokenizer-json-corrupt": Case(lambda src: (src / "tokenizer.json").write_text('{"model": {"vocab": '),
                                   ("tokenizer.json", "not valid JSON"), save=True),
    # interrupted writes: the disk fills up while the second shard is written
    "disk-full-mid-write": Case(lambda src: None, ("No space left on device",), error=OSError, save=True,
                                patch=_disk_full_on_second_shard, code=1),
    # save_pretrained's own argument
    "save-config-not-a-dict": Case(lambda src: (src / "config.json").write_text('["model_type", "llama"]'),
                                   ("save_pretrained", "config", "list"), save=True, cli=False),
}


def _source(good: Path, tmp_path: Path, case: Case) -> Path:
    src = tmp_path / "src"
    shutil.copytree(good, src)
    case.edit(src)
    return src


def _save(src: Path, dst: Path) -> None:
    """Load the good model and save it with the (maybe broken) folder's files and config as they are."""
    config = json.loads((src / "config.json").read_text())
    model = llama.build(llama.ModelArgs.from_dict(CONFIG))
    model.load_weights(list(load_state_dict(src).items()))
    model.pretrained = mlx_zeta.converters.PretrainedInfo("llama", config, src)
    mlx_zeta.save_pretrained(model, dst, max_shard_bytes=20_000)


@pytest.mark.parametrize("name", list(CASES))
def test_api(name, good, tmp_path, monkeypatch):
    case = CASES[name]
    src, dst = _source(good, tmp_path, case), tmp_path / "dst"
    if case.patch is not None:
        case.patch(monkeypatch)
    fn, args = (_save, (src, dst)) if case.save else (mlx_zeta.from_pretrained, (src,))
    api_error(case.error, fn, *args, names=case.names, pattern=case.pattern, clean=(tmp_path,))
    assert not dst.exists()


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.cli])
def test_cli(name, good, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    src, dst = _source(good, tmp_path, case), tmp_path / "dst"
    if case.patch is not None:
        case.patch(monkeypatch)
    cli_error(capsys, ["convert", src, dst, "--max-shard-size", "20KB"], names=case.names, pattern=case.pattern,
              clean=(tmp_path,), code=case.code, absent=(dst,))


def test_allow_nonfinite_converts_with_one_warning_line(good, tmp_path, capsys):
    """The opt-out of the weight-nan case: the same folder converts, with one warning line."""
    from mlx_zeta.cli import main

    src = _source(good, tmp_path, CASES["weight-nan"])
    assert main(["convert", str(src), str(tmp_path / "dst"), "--allow-nonfinite"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "warning:" in line]
    assert len(warned) == 1 and KEY in warned[0] and "3 NaN/Inf values; loaded anyway" in warned[0], err
    with pytest.warns(UserWarning, match="3 NaN/Inf values; loaded anyway"):
        assert mx.isnan(load_state_dict(tmp_path / "dst", allow_nonfinite=True)[KEY]).sum().item() == 3
