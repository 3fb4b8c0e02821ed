"""Official PyTorch checkpoints: parity with timm and HF, namings, files, errors."""

import re

import numpy as np
import pytest
from checkpoint_names import timm_to_cvnets  # noqa: E402  (tests/ is on sys.path)

import keras_mobilevitv2
from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import convert
from keras_mobilevitv2 import load_pytorch_weights
from keras_mobilevitv2 import weights as weights_lib

torch = pytest.importorskip("torch")
WIDTH_OF = {"050": 0.5, "100": 1.0}


def _timm_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _keras_model(width, **kwargs):
    kwargs.setdefault("include_preprocessing", False)
    kwargs.setdefault("classifier_activation", None)
    return MobileViTv2(width, weights=None, **kwargs)


def _state_dict(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("suffix", ["050", "100"])
@pytest.mark.parametrize(
    "size",
    [(256, 256), (384, 384), (224, 224), (250, 318)],
    ids=["256", "384", "224-odd-resize", "non-square"],
)
def test_logits_match_timm(timm_reference, suffix, size):
    reference = timm_reference(suffix)
    model = _keras_model(WIDTH_OF[suffix], input_shape=size + (3,))
    assert load_pytorch_weights(model, reference.state_dict()) == "timm"
    x = np.random.RandomState(1).rand(2, *size, 3).astype("float32")
    expected = _timm_logits(reference, x)
    assert np.abs(expected).max() > 1.0  # the weights are not degenerate
    np.testing.assert_allclose(model.predict_on_batch(x), expected, rtol=0, atol=1e-4)


def test_hugging_face_naming_loads_the_same_model(timm_reference):
    transformers = pytest.importorskip("transformers")
    reference = timm_reference("050")
    hf_model = transformers.MobileViTV2ForImageClassification(
        transformers.MobileViTV2Config(width_multiplier=0.5, num_labels=1000)
    ).eval()
    # The HF and timm modules hold the same tensors in the same order.
    hf_names = list(hf_model.state_dict())
    timm_tensors = list(reference.state_dict().values())
    assert len(hf_names) == len(timm_tensors) == 269
    hf_state = dict(zip(hf_names, timm_tensors))
    hf_model.load_state_dict(hf_state)

    from_timm = _keras_model(0.5)
    from_hf = _keras_model(0.5)
    load_pytorch_weights(from_timm, reference.state_dict())
    assert load_pytorch_weights(from_hf, hf_state) == "hf"
    for a, b in zip(from_timm.weights, from_hf.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    # and HF's own forward pass agrees where it is correct (even block inputs)
    x = np.random.RandomState(2).rand(1, 256, 256, 3).astype("float32")
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(from_hf.predict_on_batch(x), expected, atol=1e-4)


def test_ml_cvnets_naming_and_pt_file(timm_reference, tmp_path):
    reference = timm_reference("050")
    cvnets_state = {timm_to_cvnets(k): v for k, v in reference.state_dict().items()}
    assert "layer_4.1.global_rep.4.weight" in cvnets_state
    path = tmp_path / "mobilevitv2-0.5.pt"
    torch.save(cvnets_state, path)  # a plain state_dict, as ml-cvnets publishes

    model = MobileViTv2(0.5, weights=str(path), include_preprocessing=False, classifier_activation=None)
    x = np.random.RandomState(3).rand(1, 224, 224, 3).astype("float32")
    np.testing.assert_allclose(model.predict_on_batch(x), _timm_logits(reference, x), atol=1e-4)
    # checkpoints wrapped by a trainer and saved from DataParallel load too
    wrapped = {"state_dict": {f"module.{k}": v for k, v in cvnets_state.items()}}
    model_b = _keras_model(0.5)
    assert load_pytorch_weights(model_b, wrapped) == "cvnets"
    np.testing.assert_array_equal(model_b.predict_on_batch(x), model.predict_on_batch(x))


def test_safetensors_file_needs_no_torch(timm_reference, tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference = timm_reference("050")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(_state_dict(reference), str(path))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # torch unavailable
    model = MobileViTv2(0.5, weights=str(path), include_preprocessing=False, classifier_activation=None)
    monkeypatch.undo()
    x = np.random.RandomState(4).rand(1, 256, 256, 3).astype("float32")
    np.testing.assert_allclose(model.predict_on_batch(x), _timm_logits(reference, x), atol=1e-4)


def test_pt_file_without_torch_gives_clear_error(tmp_path, monkeypatch, timm_reference):
    path = tmp_path / "model.pt"
    torch.save(_state_dict(timm_reference("050")), path)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        MobileViTv2(0.5, weights=str(path))


class _CodeOnUnpickle:
    """Unpickling this object would create a file: plain pickle runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"stem.conv.weight": _CodeOnUnpickle(marker)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        MobileViTv2(0.5, weights=str(path))
    assert not marker.exists()


def test_no_top_ignores_the_classifier_only(timm_reference):
    state = _state_dict(timm_reference("050"))
    model = MobileViTv2(0.5, weights=None, include_top=False)
    load_pytorch_weights(model, state)
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"(?s)no place in model.*extra\.weight"):
        load_pytorch_weights(model, state)


def test_mismatches_name_the_tensor_and_both_shapes(timm_reference):
    state = _state_dict(timm_reference("050"))
    with pytest.raises(ValueError, match=r"'head\.fc\.weight' has shape \(1000, 256\).*\(256, 10\)"):
        load_pytorch_weights(_keras_model(0.5, classes=10), state)
    with pytest.raises(ValueError, match=r"'stem\.conv\.weight' has shape \(16, 3, 3, 3\)"):
        load_pytorch_weights(_keras_model(1.0), state)
    del state["stages.2.1.norm.weight"]
    model = _keras_model(0.5)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"no tensor 'stages\.2\.1\.norm\.weight'"):
        load_pytorch_weights(model, state)
    for a, b in zip(before, model.weights):  # nothing half-loaded
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(ValueError, match="Could not recognise"):
        load_pytorch_weights(model, {"fc.weight": np.zeros((2, 2))})


def test_converter_command_writes_weights_h5(timm_reference, tmp_path):
    reference = timm_reference("050")
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(_state_dict(reference), checkpoint)
    output = tmp_path / "mobilevitv2_050.weights.h5"
    assert convert.main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    model = keras_mobilevitv2.MobileViTv2_050(
        weights=str(output), include_preprocessing=False, classifier_activation=None
    )
    x = np.random.RandomState(5).rand(1, 256, 256, 3).astype("float32")
    np.testing.assert_allclose(model.predict_on_batch(x), _timm_logits(reference, x), atol=1e-4)
    # never overwrites silently, and refuses a width that contradicts the file
    with pytest.raises(SystemExit):
        convert.main(["--checkpoint", str(checkpoint), "--output", str(output)])
    with pytest.raises(SystemExit):
        convert.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "b.weights.h5"), "--width", "1.0"])


def test_imagenet_weights_come_from_the_cache(timm_reference, tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setattr(weights_lib, "CACHE_DIR", str(tmp_path))
    (tmp_path / "models").mkdir()
    reference = timm_reference("050")
    cached = tmp_path / "models" / "mobilevitv2_050.imagenet1k.safetensors"
    safetensors_torch.save_file(_state_dict(reference), str(cached))
    # A cached file is used only when its SHA-256 is the recorded one.
    recorded = weights_lib.ImagenetFile("http://127.0.0.1:9/050/model.safetensors", weights_lib.sha256_of(cached))
    monkeypatch.setitem(weights_lib.IMAGENET_FILES, "050", recorded)
    model = keras_mobilevitv2.MobileViTv2_050(weights="imagenet", include_preprocessing=False)
    x = np.random.RandomState(6).rand(1, 256, 256, 3).astype("float32")
    expected = torch.softmax(torch.from_numpy(_timm_logits(reference, x)), -1).numpy()
    np.testing.assert_allclose(model.predict_on_batch(x), expected, atol=1e-5)


def test_imagenet_without_network_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_lib, "CACHE_DIR", str(tmp_path))
    published = weights_lib.IMAGENET_FILES["100"]
    monkeypatch.setitem(
        weights_lib.IMAGENET_FILES, "100", published._replace(url="http://127.0.0.1:9/100/model.safetensors")
    )
    cached = re.escape(str(tmp_path / "models" / "mobilevitv2_100.imagenet1k.safetensors"))
    with pytest.raises(
        OSError, match=r"(?s)download.*127\.0\.0\.1:9/100/model\.safetensors.*weights='/path/to/.*" + cached
    ):
        keras_mobilevitv2.MobileViTv2_100(weights="imagenet")


def test_infer_architecture_from_checkpoint(timm_reference):
    assert convert.infer_architecture(timm_reference("100").state_dict()) == (1.0, 1000)
