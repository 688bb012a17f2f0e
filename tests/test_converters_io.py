"""Tests for mlx_zeta.converters.io: checkpoint reading, key checking, atomic saving."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_zeta.converters import (
    CheckpointFormatError,
    check_keys,
    load_state_dict,
    save_state_dict,
)


def _weights():
    return {
        "a.weight": mx.random.normal((4, 8)),
        "a.bias": mx.random.normal((8,)),
        "b.weight": mx.random.normal((8, 8)).astype(mx.bfloat16),
        "q.packed": mx.array(np.arange(32, dtype=np.uint8).reshape(4, 8)),
        "step": mx.array([3], dtype=mx.int32),
    }


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def _torch_equal(weights, state_dict):
    import torch

    for k, v in state_dict.items():
        ref = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        got = weights[k].astype(mx.float32) if v.dtype == torch.bfloat16 else weights[k]
        np.testing.assert_array_equal(np.array(got), ref, err_msg=k)


# --------------------------------------------------------------------------- round trips


def test_round_trip_single(tmp_path):
    w = _weights()
    written = save_state_dict(w, tmp_path / "ckpt", config={"hidden": 8})
    assert written == ["model.safetensors", "config.json"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {"hidden": 8}
    _assert_same(load_state_dict(tmp_path / "ckpt"), w)
    _assert_same(load_state_dict(tmp_path / "ckpt" / "model.safetensors"), w)


def test_round_trip_sharded(tmp_path):
    w = _weights()
    written = save_state_dict(w, tmp_path, max_shard_bytes=100)
    shards = [n for n in written if n.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
    assert set(index["weight_map"]) == set(w)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    _assert_same(load_state_dict(tmp_path), w)
    _assert_same(load_state_dict(tmp_path / "model.safetensors.index.json"), w)


def test_resave_replaces_layout(tmp_path):
    w = _weights()
    save_state_dict(w, tmp_path, max_shard_bytes=100)
    w2 = {"only": mx.ones((2, 2))}
    save_state_dict(w2, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    _assert_same(load_state_dict(tmp_path), w2)
    save_state_dict(w, tmp_path, max_shard_bytes=100)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same(load_state_dict(tmp_path), w)


@pytest.mark.parametrize("dtype", ["float16", mx.bfloat16, "float32"])
def test_dtype_casts_floats_only(tmp_path, dtype):
    w = _weights()
    save_state_dict(w, tmp_path)
    got = load_state_dict(tmp_path, dtype=dtype)
    want = dtype if isinstance(dtype, mx.Dtype) else getattr(mx, dtype)
    for k in ("a.weight", "a.bias", "b.weight"):
        assert got[k].dtype == want
    _assert_same({k: got[k] for k in ("q.packed", "step")}, {k: w[k] for k in ("q.packed", "step")})


def test_bad_dtype(tmp_path):
    save_state_dict(_weights(), tmp_path)
    with pytest.raises(ValueError, match="int8"):
        load_state_dict(tmp_path, dtype="int8")


# --------------------------------------------------------------------------- torch and transformers


def test_torch_bin(tmp_path):
    import torch

    sd = {
        "w": torch.randn(3, 5),
        "h": torch.randn(4).half(),
        "bf": torch.randn(2, 3).bfloat16(),
        "idx": torch.arange(6, dtype=torch.int64),
        "t": torch.randn(5, 3).t(),  # non-contiguous view
    }
    for ext in (".bin", ".pt", ".pth"):
        path = tmp_path / f"weights{ext}"
        torch.save(sd, path)
        got = load_state_dict(path)
        assert got["bf"].dtype == mx.bfloat16 and got["h"].dtype == mx.float16
        _torch_equal(got, sd)


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def test_transformers_sharded_safetensors(tmp_path):
    model = _tiny_bert()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    got = load_state_dict(tmp_path)
    sd = model.state_dict()
    # safetensors drops duplicate names of shared tensors; whatever is kept must match
    assert set(got) <= set(sd) and len(got) > 0
    _torch_equal(got, {k: sd[k] for k in got})


def test_sharded_torch_bin(tmp_path):
    # transformers 5 always writes safetensors, so shard the .bin the way
    # transformers 4 did: huggingface_hub's splitter, torch.save per shard.
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = _tiny_bert().state_dict()
    split = split_torch_state_dict_into_shards(
        sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="20KB"
    )
    assert split.is_sharded
    for fname, keys in split.filename_to_tensors.items():
        torch.save({k: sd[k].contiguous() for k in keys}, tmp_path / fname)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    got = load_state_dict(tmp_path)
    assert set(got) == set(sd)
    _torch_equal(got, sd)


# --------------------------------------------------------------------------- errors


def test_truncated_safetensors(tmp_path):
    save_state_dict(_weights(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointFormatError, match="model.safetensors.*truncated"):
        load_state_dict(tmp_path)
    path.write_bytes(b"\x05")
    with pytest.raises(CheckpointFormatError, match="Could not read.*model.safetensors"):
        load_state_dict(path)
    path.write_bytes(data[:8] + b"not json" + data[16:])
    with pytest.raises(CheckpointFormatError, match="Could not read.*model.safetensors"):
        load_state_dict(path)


def test_corrupted_bin(tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="Could not read.*pytorch_model.bin"):
        load_state_dict(tmp_path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointFormatError, match="Could not read.*pytorch_model.bin"):
        load_state_dict(path)


def test_missing_shard(tmp_path):
    w = _weights()
    save_state_dict(w, tmp_path, max_shard_bytes=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key, shard = sorted(index["weight_map"].items())[0]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointFormatError) as e:
        load_state_dict(tmp_path)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and shard in msg and repr(key) in msg


def test_unsupported_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.npz.*\.safetensors, \.bin, \.pt, \.pth"):
        load_state_dict(path)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match="model.safetensors.*pytorch_model.bin"):
        load_state_dict(tmp_path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointFormatError, match="evil.bin.*arbitrary pickles are not loaded"):
        load_state_dict(path)
    assert not marker.exists()


def test_check_keys():
    w = {"a": mx.zeros((2, 3)), "b": mx.zeros((4,)), "extra": mx.zeros((1,))}
    check_keys({"a": (2, 3), "b": (4,), "extra": (1,)}, w, "ok")
    with pytest.raises(ValueError) as e:
        check_keys({"a": (3, 2), "b": (4,), "gone": (5,)}, w, "bert.safetensors")
    msg = str(e.value)
    assert msg.startswith("[bert.safetensors]")
    assert "missing keys 1: gone" in msg and "unexpected keys 1: extra" in msg
    assert "a: model expects (3, 2), checkpoint has (2, 3)" in msg


def test_check_keys_truncates_long_lists():
    expected = {f"k{i:03d}": (1,) for i in range(50)}
    with pytest.raises(ValueError) as e:
        check_keys(expected, {}, "m")
    msg = str(e.value)
    assert "missing keys 50: k000" in msg and "k019" in msg and "k020" not in msg
    assert "(30 more)" in msg


# --------------------------------------------------------------------------- atomicity


def _failing_on_second_shard(monkeypatch):
    real = mx.save_safetensors
    calls = []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            real(path, arrays, metadata=metadata)  # leave a complete file in tmp ...
            raise OSError("disk full")  # ... then fail
        real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save)


def test_failed_save_new_folder_leaves_nothing(tmp_path, monkeypatch):
    _failing_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(_weights(), tmp_path / "out", max_shard_bytes=100, config={"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_existing_folder_untouched(tmp_path, monkeypatch):
    old = {"old": mx.arange(4)}
    save_state_dict(old, tmp_path, config={"v": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _failing_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(_weights(), tmp_path, max_shard_bytes=100, config={"v": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _assert_same(load_state_dict(tmp_path), old)


# ---- NaN / Inf weights -------------------------------------------------------------------------

SPECIALS = [0.0, -0.0, 1.0, -1.0, float("nan"), -float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32, mx.float64])
def test_the_bit_rule_agrees_with_isfinite(dtype):
    """_has_nonfinite reads the bits: it must say exactly what isfinite says, for each special value
    alone and hidden at any place among normal values, subnormals and the largest finite ones."""
    from mlx_zeta.converters.io import _has_nonfinite

    finfo = np.finfo(np.float32 if dtype in (mx.bfloat16, mx.float32) else
                     np.float16 if dtype == mx.float16 else np.float64)
    edges = [float(finfo.max), -float(finfo.max), float(finfo.tiny) / 4, -float(finfo.tiny) / 4]
    with mx.stream(mx.cpu):  # float64 runs on the CPU only
        for value in SPECIALS + edges:
            for where in (0, 517, 4095):
                x = mx.array(np.random.default_rng(where).standard_normal(4096), dtype)
                x[where] = value
                x[(where + 1) % 4096] = edges[where % 4]
                want = not mx.all(mx.isfinite(x)).item()
                assert _has_nonfinite(x).item() == want, (value, where)


@pytest.mark.parametrize("dtype,bad", [(mx.float32, -float("inf")), (mx.float16, float("inf")),
                                       (mx.bfloat16, float("nan"))])
def test_nonfinite_weights_are_refused_naming_file_tensor_and_count(tmp_path, dtype, bad):
    w = _weights()
    w["b.weight"] = w["b.weight"].astype(dtype)
    w["b.weight"][1, :3] = bad
    save_state_dict(w, tmp_path, max_shard_bytes=200)  # several shards: the file named is the shard
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["b.weight"]
    with pytest.raises(CheckpointFormatError) as info:
        load_state_dict(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / shard}: tensor 'b.weight' has 3 NaN/Inf values;"), message
    assert "allow_nonfinite=True" in message and "\n" not in message
    with pytest.warns(UserWarning, match=r"tensor 'b.weight' has 3 NaN/Inf values; loaded anyway"):
        loaded = load_state_dict(tmp_path, allow_nonfinite=True)
    assert mx.logical_not(mx.isfinite(loaded["b.weight"])).sum().item() == 3


def test_finite_weights_and_integer_tensors_pass(tmp_path):
    w = _weights()
    w["q.packed"] = mx.full((4, 8), 255, mx.uint8)  # integers are never NaN
    save_state_dict(w, tmp_path)
    _assert_same(load_state_dict(tmp_path), w)
