"""ONNX export: float and QDQ int8, checked against onnxruntime."""

import collections
import os

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import keras  # noqa: E402
from conftest import randomize_keras_model  # noqa: E402
from conftest import tiny_mobilevitv2  # noqa: E402

from keras_mobilevitv2 import MobileViTv2_050  # noqa: E402
from quantization import calibrate  # noqa: E402
from quantization import quantize_model  # noqa: E402
from quantization.quantize import quantizers  # noqa: E402
from quantization.targets import onnx as onnx_export  # noqa: E402
from quantization.targets.onnx import export_onnx  # noqa: E402
from quantization.targets.onnx import format_report as format_onnx_report  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(48, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def float_model():
    return tiny_mobilevitv2()


@pytest.fixture(scope="module")
def qat_model(float_model, images):
    return calibrate(quantize_model(float_model), images[:32])


@pytest.fixture(scope="module")
def exported(float_model, qat_model, images, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    reports = {}
    for kind, model in (("float", float_model), ("qat", qat_model)):
        path = str(directory / f"{kind}.onnx")
        reports[kind] = export_onnx(model, path, sample_images=images[32:])
    return reports


def _run(path, images):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def test_float_export_matches_keras(exported, float_model, images):
    report = exported["float"]
    agreement = report["agreement"]
    assert agreement["samples"] == 16
    assert agreement["max_abs_error"] < 1e-5 and agreement["top1_agreement"] == 1.0
    assert not report["quantized"] and report["quantize_linear"] == 0
    assert report["opset"] == 17 and os.path.getsize(report["path"]) == report["size_bytes"]
    assert report["input"] == {"name": "image", "shape": ["batch", SIZE, SIZE, 3]}
    # dynamic batch: any batch size runs, and matches Keras
    for batch in (images[:1], images[:5]):
        np.testing.assert_allclose(_run(report["path"], batch), float_model.predict_on_batch(batch), atol=1e-5)
    assert "ONNX float" in format_onnx_report(report)


def test_qat_export_is_qdq_and_matches_keras(exported, qat_model, images):
    report = exported["qat"]
    graph = onnx.load(report["path"]).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    assert report["quantized"]
    # one QuantizeLinear/DequantizeLinear pair per activation fake-quant ...
    assert counts["QuantizeLinear"] == report["quantize_linear"] == len(quantizers(qat_model))
    # ... plus one DequantizeLinear per weight, stored as int8
    weights = counts["Conv"] + counts["MatMul"]
    assert report["int8_weights"] == weights
    assert counts["DequantizeLinear"] == report["quantize_linear"] + weights
    int8_initializers = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8_initializers) == weights
    assert not any("FakeQuant" in node.op_type for node in graph.node)

    agreement = report["agreement"]
    # The output is a softmax with TFLite's fixed int8 range: step 1/256.
    assert agreement["output_quantization_step"] == pytest.approx(1 / 256)
    assert agreement["mean_error_in_steps"] <= onnx_export.QAT_MEAN_TOLERANCE_STEPS
    assert agreement["max_error_in_steps"] <= onnx_export.QAT_MAX_TOLERANCE_STEPS
    assert agreement["top1_agreement"] >= 0.9
    # the figures describe the written file
    actual = _run(report["path"], images[32:])
    difference = np.abs(actual - qat_model.predict_on_batch(images[32:]))
    assert difference.max() == pytest.approx(agreement["max_abs_error"], abs=1e-6)
    assert "QuantizeLinear" in format_onnx_report(report)


def test_fixed_batch_size(float_model, images, tmp_path):
    path = str(tmp_path / "batch2.onnx")
    report = export_onnx(float_model, path, sample_images=images[:5], batch_size=2)  # 5: last batch padded
    assert report["input"]["shape"] == [2, SIZE, SIZE, 3] and report["output"]["shape"] == [2, 5]
    assert report["agreement"]["samples"] == 5 and report["agreement"]["max_abs_error"] < 1e-5


def test_bad_inputs(float_model, images, tmp_path):
    path = str(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(float_model, str(tmp_path / "model.tflite"))
    with pytest.raises(ValueError, match="shape"):
        export_onnx(float_model, path, sample_images=images[:, :16])
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(float_model, path, batch_size=0)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(float_model, path, opset=11)
    inputs = keras.Input((None, None, 3))
    dynamic = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    with pytest.raises(ValueError, match="static"):
        export_onnx(dynamic, path)
    with pytest.raises(ValueError, match="calibrate"):
        export_onnx(quantize_model(float_model), path)
    assert os.listdir(tmp_path) == []


def test_disagreement_raises_and_writes_nothing(float_model, images, tmp_path, monkeypatch):
    run = onnx_export._run_onnxruntime
    monkeypatch.setattr(onnx_export, "_run_onnxruntime", lambda *args: run(*args) + 1e-2)
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="onnxruntime disagrees"):
        export_onnx(float_model, str(path), sample_images=images[:4])
    assert os.listdir(tmp_path) == []  # neither the model nor its temporary file


def test_mobilevitv2_050_float_export(tmp_path):
    model = randomize_keras_model(MobileViTv2_050(weights=None, input_shape=(64, 64, 3), classes=10), seed=3)
    images = np.random.RandomState(1).rand(8, 64, 64, 3).astype("float32") * 255
    report = export_onnx(model, str(tmp_path / "m.onnx"), sample_images=images)
    assert report["agreement"]["max_abs_error"] < 1e-5 and report["agreement"]["top1_agreement"] == 1.0
    # 64 convolutions, and the qkv projection of each of the 9 attentions as 3 (layers.folding)
    assert report["op_types"]["Conv"] == 64 + 2 * 9 and "Softmax" in report["op_types"]


def test_mobilevitv2_050_qat_export(tmp_path):
    # The full network at 64x64 (about a minute on 2 cores): the one-step
    # differences between onnxruntime and TensorFlow spread through its 9
    # attention blocks, which the tiny model does not show.
    model = randomize_keras_model(MobileViTv2_050(weights=None, input_shape=(64, 64, 3), classes=10), seed=3)
    images = np.random.RandomState(0).rand(48, 64, 64, 3).astype("float32") * 255
    qat = calibrate(quantize_model(model), images[:32])
    report = export_onnx(qat, str(tmp_path / "m.onnx"), sample_images=images[32:])
    # 80 int8 weight tensors: 70 convolutions (q, k and v as three in each of the 9 attentions, three
    # projection pairs merged), 9 depthwise, the classifier
    assert report["quantize_linear"] == len(quantizers(qat)) and report["int8_weights"] == 80
    agreement = report["agreement"]
    # measured: mean 1.1, max 6 steps (see QAT_*_TOLERANCE_STEPS)
    assert agreement["mean_error_in_steps"] <= onnx_export.QAT_MEAN_TOLERANCE_STEPS
    assert agreement["max_error_in_steps"] <= onnx_export.QAT_MAX_TOLERANCE_STEPS
    assert agreement["top1_agreement"] >= 0.9


def test_qat_export_refuses_a_max_error_above_the_bound(qat_model, images, tmp_path, monkeypatch):
    # One output 50 steps off (mean still within its bound) against a max
    # bound of 40 steps: refused, whatever the bound is set to.
    monkeypatch.setattr(onnx_export, "QAT_MAX_TOLERANCE_STEPS", 40.0)
    run = onnx_export._run_onnxruntime

    def one_output_off(*args):
        outputs = run(*args)
        outputs[0, 0] += 50 / 256
        return outputs

    monkeypatch.setattr(onnx_export, "_run_onnxruntime", one_output_off)
    with pytest.raises(ValueError, match="max \\|error\\| above the QAT tolerance"):
        export_onnx(qat_model, str(tmp_path / "m.onnx"), sample_images=images[32:])
    assert os.listdir(tmp_path) == []
