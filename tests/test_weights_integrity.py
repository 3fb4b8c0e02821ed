"""No silent wrong weights: checkpoints must fit exactly, files must be intact.

The ImageNet download tests never touch the network: they serve files
through `file://` URLs or point at a closed local port.
"""

import hashlib
import json
import re
import struct

import keras
import numpy as np
import pytest

from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import load_pytorch_weights
from keras_mobilevitv2 import weights as weights_lib
from keras_mobilevitv2.checkpoint_io import read_checkpoint
from keras_mobilevitv2.config import WIDTHS


def _numpy_state(reference):
    return {name: tensor.numpy().copy() for name, tensor in reference.state_dict().items()}


def _snapshot(model):
    return [w.numpy().copy() for w in model.weights]


def _assert_untouched(model, before):
    for expected, variable in zip(before, model.weights):
        np.testing.assert_array_equal(expected, variable.numpy(), err_msg=variable.path)


# --- both sides of a checkpoint are checked before anything is assigned ---


def test_batch_norm_attention_model_refuses_group_norm_checkpoint(timm_reference):
    # A reference (GroupNorm) checkpoint has no running statistics for the 36
    # BatchNorm attention/FFN norms of the width-0.5 model (9 blocks x 2 norms
    # x mean/variance): loading it would leave them at their initial values.
    state = _numpy_state(timm_reference("050"))
    model = MobileViTv2(0.5, weights=None, attention_norm="batch_norm_2d")
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_pytorch_weights(model, state)
    message = str(info.value)
    assert "36 Keras weights have no tensor in the checkpoint" in message
    assert "'stages.2.1.transformer.0.norm1.running_mean'" in message
    assert "... and 26 more" in message  # long lists are cut, counts kept
    assert "attention_norm='batch_norm_2d'" in message
    _assert_untouched(model, before)


def test_layers_outside_the_name_table_are_refused(timm_reference):
    base = MobileViTv2(0.5, weights=None, include_top=False, pooling="avg")
    outputs = keras.layers.Dense(3, name="extra_head")(base.output)
    model = keras.Model(base.input, outputs)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)2 Keras weights belong to layers.*extra_head"):
        load_pytorch_weights(model, _numpy_state(timm_reference("050")))
    _assert_untouched(model, before)


def test_every_misfit_is_reported_at_once(timm_reference):
    state = _numpy_state(timm_reference("050"))
    del state["stages.2.1.norm.weight"]
    state["stages.9.extra.weight"] = np.zeros(3, "float32")
    state["stem.bn.num_batches_tracked"] = np.array(5)  # bookkeeping: ignored
    model = MobileViTv2(0.5, weights=None, classes=10)
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_pytorch_weights(model, state)
    message = str(info.value)
    for expected in (
        "1 Keras weights have no tensor in the checkpoint",
        "no tensor 'stages.2.1.norm.weight' for stage3_mvit/final_norm/gamma (64,)",
        "2 checkpoint tensors have the wrong shape",
        "'head.fc.bias' has shape (1000,)",
        "1 checkpoint tensors have no place in model 'mobilevitv2_050'",
        "stages.9.extra.weight",
    ):
        assert expected in message
    assert "num_batches_tracked" not in message
    _assert_untouched(model, before)


# --- safetensors files are checked entry by entry ---


def _write_safetensors(path, header, data=b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return str(path)


_GOOD_DATA = np.arange(6, dtype="float32").tobytes()  # 24 bytes


@pytest.mark.parametrize(
    "entry, data, message",
    [
        ({"dtype": "F32", "shape": [2, 3]}, _GOOD_DATA, r"'w'.*lacks \['data_offsets'\]"),
        ({"shape": [2, 3], "data_offsets": [0, 24]}, _GOOD_DATA, r"'w'.*lacks \['dtype'\]"),
        (
            {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},
            _GOOD_DATA,
            r"'w'.*\[0, 20\] hold 20 bytes, but dtype F32 and shape \[2, 3\] need 24",
        ),
        (
            {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]},
            _GOOD_DATA,
            r"'w'.*hold 24 bytes, but dtype F16 and shape \[2, 3\] need 12",
        ),
        (
            {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            _GOOD_DATA[:16],
            r"'w'.*ends at byte 24.*only 16 data bytes: it is truncated",
        ),
        ({"dtype": "F32", "shape": 6, "data_offsets": [0, 24]}, _GOOD_DATA, r"'w'.*shape 6 is not a list"),
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}, _GOOD_DATA, r"'w'.*data_offsets \[24, 0\]"),
        ({"dtype": "C64", "shape": [3], "data_offsets": [0, 24]}, _GOOD_DATA, r"'w'.*dtype 'C64'.*not supported"),
        ("F32", _GOOD_DATA, r"'w'.*header entry is str"),
    ],
    ids=[
        "no-offsets",
        "no-dtype",
        "offsets-too-short",
        "offsets-vs-dtype",
        "truncated",
        "bad-shape",
        "reversed-offsets",
        "unknown-dtype",
        "entry-not-object",
    ],
)
def test_damaged_safetensors_entry_names_the_tensor(tmp_path, entry, data, message):
    path = _write_safetensors(tmp_path / "m.safetensors", {"w": entry}, data)
    with pytest.raises(ValueError, match=message):
        read_checkpoint(path)


def test_damaged_safetensors_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_checkpoint(str(path))
    with pytest.raises(ValueError, match="header is a JSON list"):
        read_checkpoint(_write_safetensors(path, [1, 2]))
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="claims 100 bytes but only 2 follow"):
        read_checkpoint(str(path))


def test_intact_safetensors_reads_back(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "s": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]},
    }
    data = _GOOD_DATA + np.array(7, "int64").tobytes()
    tensors = read_checkpoint(_write_safetensors(tmp_path / "m.safetensors", header, data))
    np.testing.assert_array_equal(tensors["w"], np.arange(6, dtype="float32").reshape(2, 3))
    assert tensors["s"] == 7 and sorted(tensors) == ["s", "w"]


# --- weights="imagenet": pinned revision, verified SHA-256 ---


def test_every_width_has_a_pinned_or_refused_download():
    assert set(weights_lib.IMAGENET_FILES) == set(WIDTHS)
    revision = r"([0-9a-f]{40}|main|refs%2Fpr%2F\d+)"
    for suffix, (url, sha256) in weights_lib.IMAGENET_FILES.items():
        assert re.fullmatch(
            r"https://huggingface\.co/[\w./-]+/resolve/" + revision + r"/(model\.safetensors|pytorch_model\.bin)", url
        ), suffix
        assert sha256 is None or re.fullmatch(r"[0-9a-f]{64}", sha256), suffix
    # Where a full commit id is known, the download is pinned to it.
    assert "/resolve/75eb7f2bb7f9bd8662106fd0e43b675c0607f4dc/" in weights_lib.IMAGENET_FILES["100"].url


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A served file for width 0.5 and an empty cache; returns (file, sha256)."""
    hub = tmp_path / "hub"
    (hub / "050").mkdir(parents=True)
    served = hub / "050" / "model.safetensors"
    served.write_bytes(b"pretend these are MobileViTv2-0.5 weights")
    sha256 = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setattr(weights_lib, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(weights_lib.IMAGENET_FILES, "050", weights_lib.ImagenetFile(f"file://{served}", sha256))
    return served, sha256


def _cached(tmp_path):
    return tmp_path / "cache" / "models" / "mobilevitv2_050.imagenet1k.safetensors"


def test_imagenet_download_with_the_right_hash_is_used(fake_hub, tmp_path):
    served, _ = fake_hub
    path = weights_lib.imagenet_weights_path(0.5)
    assert path == str(_cached(tmp_path))
    assert _cached(tmp_path).read_bytes() == served.read_bytes()
    served.unlink()  # the verified cached copy is used from now on
    assert weights_lib.imagenet_weights_path(0.5) == path


def test_wrong_cached_file_names_the_file_and_both_hashes(fake_hub, tmp_path):
    _, expected = fake_hub
    _cached(tmp_path).parent.mkdir(parents=True)
    _cached(tmp_path).write_bytes(b"a truncated or stale download")
    actual = hashlib.sha256(b"a truncated or stale download").hexdigest()
    with pytest.raises(ValueError) as info:
        weights_lib.imagenet_weights_path(0.5)
    message = str(info.value)
    assert str(_cached(tmp_path)) in message and actual in message and expected in message


def test_wrong_download_names_both_hashes_and_is_not_kept(fake_hub, tmp_path, monkeypatch):
    served, _ = fake_hub
    recorded = hashlib.sha256(b"the published file").hexdigest()
    monkeypatch.setitem(weights_lib.IMAGENET_FILES, "050", weights_lib.ImagenetFile(f"file://{served}", recorded))
    actual = hashlib.sha256(served.read_bytes()).hexdigest()
    with pytest.raises(ValueError) as info:
        weights_lib.imagenet_weights_path(0.5)
    assert actual in str(info.value) and recorded in str(info.value)
    assert not _cached(tmp_path).exists()


def test_width_without_recorded_hash_refuses_imagenet(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_lib, "CACHE_DIR", str(tmp_path))
    url = "http://127.0.0.1:9/050/main/model.safetensors"
    monkeypatch.setitem(weights_lib.IMAGENET_FILES, "050", weights_lib.ImagenetFile(url, None))
    cached = tmp_path / "models" / "mobilevitv2_050.imagenet1k.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(b"whatever is cached is not trusted")
    with pytest.raises(OSError, match=r"(?s)SHA-256.*not yet recorded.*127\.0\.0\.1:9/050/main.*weights='/path/to/"):
        weights_lib.imagenet_weights_path(0.5)


def test_unknown_width_lists_the_widths_with_weights():
    with pytest.raises(ValueError, match=r"\[0\.5, 0\.75, 1\.0, 1\.25, 1\.5, 1\.75, 2\.0\].*0\.6"):
        weights_lib.imagenet_weights_path(0.6)


def test_layers_before_the_stem_are_the_users_own(timm_reference):
    # MobileViTv2(input_tensor=...) takes the caller's preprocessing layers
    # into the model; loading must not ask a checkpoint for them.
    inputs = keras.Input((64, 64, 3))
    scaled = keras.layers.Dense(3, name="user_colour_mix")(inputs)
    model = MobileViTv2(0.5, weights=None, input_tensor=scaled, include_preprocessing=False)
    user_kernel = model.get_layer("user_colour_mix").get_weights()[0].copy()
    assert load_pytorch_weights(model, _numpy_state(timm_reference("050"))) == "timm"
    np.testing.assert_array_equal(model.get_layer("user_colour_mix").get_weights()[0], user_kernel)
