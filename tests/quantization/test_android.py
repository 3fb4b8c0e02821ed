"""Android target: GPU-delegate compatibility, XNNPACK latency, export."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

import flatbuffers  # noqa: E402
import tensorflow as tf  # noqa: E402
from conftest import tiny_mobilevitv2  # noqa: E402
from tensorflow.lite.python import schema_py_generated as schema  # noqa: E402

from quantization import calibrate  # noqa: E402
from quantization import quantize_model  # noqa: E402
from quantization.targets import TargetError  # noqa: E402
from quantization.targets.android import export  # noqa: E402
from quantization.targets.android import format_report  # noqa: E402
from quantization.targets.android import xnnpack_latency  # noqa: E402
from quantization.targets.android_gpu import PARTITION_NOTE  # noqa: E402
from quantization.targets.android_gpu import analyzer_checks_gpu  # noqa: E402
from quantization.targets.android_gpu import gpu_delegate_compatibility  # noqa: E402

SIZE = 32


def convert_function(function, shape=(1, 4, 4, 8)):
    """A TFLite flatbuffer of `function` on one float input of `shape`."""
    concrete = tf.function(function).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module()).convert()


def with_softmax_beta(flatbuffer, beta):
    """The flatbuffer with every SOFTMAX's beta set to `beta` (the converter
    itself always writes 1)."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    for operator in model.subgraphs[0].operators:
        if isinstance(operator.builtinOptions, schema.SoftmaxOptionsT):
            operator.builtinOptions.beta = beta
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def constant_bytes(path):
    """Bytes of the constant buffers (the weights) of a .tflite file."""
    with open(path, "rb") as f:
        model = schema.Model.GetRootAsModel(f.read(), 0)
    return sum(model.Buffers(i).DataLength() for i in range(model.BuffersLength()))


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(40, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def float_model():
    return tiny_mobilevitv2()


@pytest.fixture(scope="module")
def android_export(float_model, images, tmp_path_factory):
    qat_model = calibrate(quantize_model(float_model), images[:32])
    directory = str(tmp_path_factory.mktemp("android"))
    report = export(
        float_model,
        directory,
        "tiny",
        calibration_images=images[:16],
        sample_images=images[32:],
        qat_model=qat_model,
        warmup=2,
        repeats=5,
    )
    return directory, report


def test_export_android_writes_both_models_and_report(android_export):
    directory, report = android_export
    files = sorted(os.listdir(directory))
    assert {"tiny.android.float16.tflite", "tiny.android.int8.tflite", "tiny.android.report.json"} <= set(files)
    with open(os.path.join(directory, "tiny.android.report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    float16, int8 = report["models"]
    assert (float16["mode"], int8["mode"]) == ("float16", "qat_int8")
    assert int8["io_type"] == "float32"
    for model in report["models"]:
        assert model["size_bytes"] == os.path.getsize(model["path"])
        latency = model["xnnpack"]
        assert latency["repeats"] == 5 and latency["threads"] == 2 and latency["batch"] == 1
        assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["max_ms"]
        assert latency["p10_ms"] <= latency["p90_ms"]
        assert model["agreement"]["top1_agreement"] >= 0.875
    # The int8 weights take less room than the float16 ones. (The file sizes
    # of this tiny test model are dominated by per-tensor metadata.)
    assert constant_bytes(int8["path"]) < 0.75 * constant_bytes(float16["path"])
    table = format_report(report)
    assert "| tiny.android.float16.tflite | float16 |" in table and "| tiny.android.int8.tflite | qat_int8 |" in table


def test_mobilevitv2_layers_run_entirely_on_the_gpu(android_export):
    _, report = android_export
    float16, int8 = report["models"]
    for model in (float16, int8):
        with open(model["path"], "rb") as f:
            gpu = gpu_delegate_compatibility(f.read())
        assert len(gpu["ops"]) == gpu["total_ops"] > 0
        assert [op["index"] for op in gpu["ops"]] == list(range(gpu["total_ops"]))
        assert gpu["unsupported"] == [] and gpu["fully_supported"]
        assert gpu["supported_ops"] == gpu["total_ops"] and gpu["gpu_partitions"] == 1
        assert gpu["cpu_partitions"] == 0 and gpu["largest_gpu_partition"] == gpu["total_ops"]
        assert model["gpu"] == {key: value for key, value in gpu.items() if key != "ops"}
    names = {op["op"] for op in gpu_delegate_compatibility(open(float16["path"], "rb").read())["ops"]}
    # float16 weights are decompressed by DEQUANTIZE ops, which the delegate folds
    assert {"DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "SOFTMAX", "MEAN"} <= names
    assert not float16["gpu"]["int8"] and int8["gpu"]["int8"]
    assert any("float view" in note for note in int8["gpu"]["notes"])


def test_ptq_int8_without_qat_model(float_model, images, tmp_path):
    report = export(
        float_model, str(tmp_path), "ptq", calibration_images=images[:8], warmup=1, repeats=2, io_type="int8"
    )
    assert [m["mode"] for m in report["models"]] == ["float16", "ptq_int8"]
    assert report["models"][1]["io_type"] == "int8" and report["models"][1]["gpu"]["int8"]


@pytest.mark.parametrize(
    "function, op, reason",
    [
        (
            lambda x: tf.reshape(tf.transpose(tf.reshape(x, [1, 2, 2, 4, 8]), [0, 2, 1, 3, 4]), [1, 4, 4, 8]),
            "TRANSPOSE",
            "rank 5",
        ),
        (lambda x: x[:, 0] + 1.0, "STRIDED_SLICE", "shrink_axis_mask"),
        (lambda x: tf.argmax(x, axis=-1), "ARG_MAX", "not supported by the GPU delegate"),
        (lambda x: x + tf.reshape(tf.range(32.0), (4, 8)), "ADD", "broadcasting [1, 4, 4, 8] with [4, 8]"),
    ],
    ids=["5d_transpose", "shrink_axis_mask", "arg_max", "add_broadcast"],
)
def test_unsupported_ops_are_reported_with_their_reason(function, op, reason):
    report = gpu_delegate_compatibility(convert_function(function))
    rejected = [entry for entry in report["unsupported"] if entry["op"] == op]
    assert rejected and reason in rejected[0]["reason"], report["unsupported"]
    assert not report["fully_supported"] and report["supported_ops"] < report["total_ops"]
    assert any(key.startswith(f"{op}: ") for key in report["unsupported_summary"])


def test_softmax_beta_must_be_one():
    flatbuffer = convert_function(tf.nn.softmax, shape=(1, 8))
    assert gpu_delegate_compatibility(flatbuffer)["fully_supported"]
    report = gpu_delegate_compatibility(with_softmax_beta(flatbuffer, 2.0))
    assert report["unsupported"] == [{"index": 0, "op": "SOFTMAX", "reason": "SOFTMAX beta must be 1 (is 2)"}]


def test_enhanced_broadcast_accepts_general_broadcasting():
    weights = tf.constant(np.arange(32, dtype="float32").reshape(4, 8))
    flatbuffer = convert_function(lambda x: x * weights)
    assert gpu_delegate_compatibility(flatbuffer)["unsupported"][0]["op"] == "MUL"
    assert gpu_delegate_compatibility(flatbuffer, enhanced_broadcast=True)["fully_supported"]


def test_an_unsupported_op_in_the_middle_splits_the_gpu_graph():
    report = gpu_delegate_compatibility(convert_function(lambda x: tf.nn.relu(x)[:, 0] * 3.0))
    assert [(op["op"], op["supported"]) for op in report["ops"]] == [
        ("RELU", True),
        ("STRIDED_SLICE", False),
        ("MUL", True),
    ]
    assert (report["gpu_partitions"], report["cpu_partitions"], report["largest_gpu_partition"]) == (2, 1, 1)
    assert PARTITION_NOTE in report["notes"]


def test_bad_arguments(float_model, android_export, tmp_path):
    directory, report = android_export
    with open(report["models"][0]["path"], "rb") as f:
        flatbuffer = f.read()
    with pytest.raises(ValueError, match="repeats"):
        xnnpack_latency(flatbuffer, repeats=0)
    qat_model = quantize_model(float_model)
    with pytest.raises(ValueError, match="qat_model"):
        export(float_model, str(tmp_path), "x", qat_model=float_model)
    with pytest.raises(ValueError, match="QAT model"):
        export(qat_model, str(tmp_path), "x")
    with pytest.raises(ValueError, match="name"):
        export(float_model, str(tmp_path), "a/b")
    assert os.listdir(tmp_path) == []


# TensorFlow's Analyzer (tf.lite.experimental.Analyzer, gpu_compatibility=True)
# in the format of tensorflow/lite/python/analyzer_wrapper/model_analyzer.cc:
# a warning line after each op gpu_compatibility.cc rejects, then a summary.
ANALYZER_TEXT = """Subgraph#0 main(T#0) -> [T#3]
  Op#0 RELU(T#0) -> [T#1]
  Op#1 REVERSE_V2(T#1, T#4[1]) -> [T#2]
GPU COMPATIBILITY WARNING: Not supported op REVERSE_V2
  Op#2 MUL(T#2, T#5) -> [T#3]

GPU COMPATIBILITY WARNING: Subgraph#0 has GPU delegate compatibility issues at nodes 1 with TFLite runtime version 2.16.1

Tensors of Subgraph#0
  T#0(x) shape:[1, 4, 4, 8], type:FLOAT32
"""  # noqa: E501  (the Analyzer's lines as it prints them)


def reverse_model(size=8):
    """A tiny float model with REVERSE_V2, an op gpu_compatibility.cc has no
    case for (the GPU delegate leaves it to the CPU)."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.flip(t, axis=1))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_analyzer_text_is_parsed_per_op():
    from quantization.targets.android_gpu import parse_analyzer_output

    assert parse_analyzer_output(ANALYZER_TEXT) == {"compatible": False, "flagged": {1: "Not supported op REVERSE_V2"}}
    clean = "\n".join(line for line in ANALYZER_TEXT.splitlines() if "WARNING" not in line)
    assert parse_analyzer_output(clean + "\nYour model looks compatible with GPU delegate on TFLite runtime")[
        "compatible"
    ]


def test_analyzer_and_our_report_agree_on_mobilevitv2(android_export):
    from quantization.targets.android_gpu import run_analyzer

    _, report = android_export
    for model in report["models"]:
        comparison = model["analyzer"]
        assert comparison["agree"] and comparison["disagreements"] == [], comparison
        assert comparison["analyzer_flagged"] == [] and comparison["analyzer_compatible"]
        assert comparison["ours_unsupported"] == 0
        with open(model["path"], "rb") as f:
            assert run_analyzer(f.read()) == {"compatible": True, "flagged": {}}
        assert comparison["analyzer_checks_gpu"] == analyzer_checks_gpu()
    assert "TensorFlow's Analyzer: compatible; ours: 0 unsupported op(s); agree" in format_report(report)


def test_an_op_the_gpu_cannot_run_is_flagged_and_the_export_refused(images, tmp_path):
    model = reverse_model()
    pictures = images[:8, :8, :8]
    (tmp_path / "kept.txt").write_text("untouched")
    with pytest.raises(TargetError, match="op #4 REVERSE_V2: REVERSE_V2 is not supported") as raised:
        export(model, str(tmp_path), "reverse", calibration_images=pictures)
    assert "allow_cpu_fallback=True" in str(raised.value) and "Nothing was written" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"]
    assert not [name for name in os.listdir(tmp_path.parent) if name.startswith(".android-")]

    float16 = raised.value.report["models"][0]
    assert float16["gpu"]["unsupported"][0]["op"] == "REVERSE_V2"
    comparison = float16["analyzer"]
    if analyzer_checks_gpu():  # a TensorFlow whose Analyzer checks: it must flag the same op
        assert [op["op"] for op in comparison["analyzer_flagged"]] == ["REVERSE_V2"] and comparison["agree"]
    else:  # TF 2.21: the Analyzer calls everything compatible; the disagreement names the deciding rule
        assert comparison["note"] and not comparison["agree"]
        assert comparison["disagreements"] == [
            {
                "index": 4,
                "op": "REVERSE_V2",
                "ours": "REVERSE_V2 is not supported by the GPU delegate",
                "analyzer": "compatible",
                "rule": "tools/versioning/gpu_compatibility.cc: no case for REVERSE_V2, default branch "
                '("Not supported op")',
            }
        ]

    report = export(model, str(tmp_path / "out"), "reverse", calibration_images=pictures, allow_cpu_fallback=True)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "reverse.android.float16.audit.json",
        "reverse.android.float16.tflite",
        "reverse.android.int8.audit.json",
        "reverse.android.int8.tflite",
        "reverse.android.report.json",
    ]
    with open(tmp_path / "out" / "reverse.android.float16.audit.json") as f:
        assert json.load(f)["path"] == report["models"][0]["path"]
    assert "decided by tools/versioning/gpu_compatibility.cc" in format_report(report) or (analyzer_checks_gpu())
