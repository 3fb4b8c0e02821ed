"""Edge TPU target: rewritten graph, documented-table report, compiler log."""

import json
import os

import numpy as np
import pytest
from conftest import randomize_keras_model

from keras_mobilevitv2 import MobileViTv2
from quantization import calibrate
from quantization import quantize_model
from quantization.audit import make_interpreter
from quantization.audit import read_structure
from quantization.audit import run_tflite
from quantization.export import convert
from quantization.targets import TargetError
from quantization.targets.edgetpu import export
from quantization.targets.edgetpu import export_flatbuffer
from quantization.targets.edgetpu_ops import MAPPED
from quantization.targets.edgetpu_ops import edgetpu_report
from quantization.targets.edgetpu_ops import parse_compiler_log

SIZE = 64
DATA = os.path.join(os.path.dirname(__file__), "data")
# Every op of the documented Edge TPU table that the rewritten graph may use.
DOCUMENTED_TABLE = {
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "LOGISTIC",
    "MAXIMUM",
    "MEAN",
    "MUL",
    "PAD",
    "RELU",
    "RESHAPE",
    "RSQRT",
    "SOFTMAX",
    "SPACE_TO_DEPTH",
    "STRIDED_SLICE",
    "SUB",
    "SUM",
    "QUANTIZE",
    "RESIZE_BILINEAR",
}


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(40, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def qat_model(images):
    model = randomize_keras_model(MobileViTv2(0.5, weights=None, input_shape=(SIZE, SIZE, 3), classes=10), seed=3)
    return calibrate(quantize_model(model), images[:32])


@pytest.fixture(scope="module")
def reference_flatbuffer(qat_model, images):
    return convert(qat_model, "qat_int8", representative_images=images[:4])


@pytest.fixture(scope="module")
def edgetpu_export(qat_model, images, tmp_path_factory):
    directory = tmp_path_factory.mktemp("edgetpu")
    report = export(qat_model, str(directory), "m050", sample_images=images)
    return report, directory


def test_edgetpu_export_maps_every_op_from_the_documented_table(edgetpu_export):
    report, directory = edgetpu_export
    flatbuffer = (directory / "m050.edgetpu.int8.tflite").read_bytes()
    ops = {name for name, _ in read_structure(flatbuffer)["ops"]}
    assert ops <= DOCUMENTED_TABLE, ops - DOCUMENTED_TABLE
    assert not ops & {"TRANSPOSE", "DEPTH_TO_SPACE", "HARD_SWISH", "BATCH_MATMUL", "DEQUANTIZE"}
    assert report["first_cpu_op"] is None and report["unsupported"] == {}
    assert report["ops_mapped"] == report["ops_total"] and report["mac_share_on_tpu"] == 1.0
    assert report["audit"]["float_tensors_inside"] == [] and report["audit"]["max_tensor_rank"] <= 4
    assert report["audit"]["input"]["shape"] == [1, SIZE, SIZE, 3]
    saved = json.loads((directory / "m050.edgetpu.report.json").read_text())
    assert saved["ops_mapped"] == report["ops_mapped"]


def test_edgetpu_rewrite_keeps_the_predictions(qat_model, edgetpu_export, reference_flatbuffer, images):
    report, directory = edgetpu_export
    assert report["rewrite_check"]["max_abs_difference"] == 0.0  # same Keras function
    rewritten = run_tflite(make_interpreter((directory / "m050.edgetpu.int8.tflite").read_bytes()), images)
    reference = run_tflite(make_interpreter(reference_flatbuffer), images)
    step = make_interpreter(reference_flatbuffer).get_output_details()[0]["quantization"][0]
    # The same int8 model computed through other data-movement ops.
    assert np.abs(rewritten - reference).max() <= step + 1e-7
    assert np.mean(rewritten.argmax(-1) == reference.argmax(-1)) == 1.0


def test_reference_graph_is_reported_with_its_first_cpu_op(reference_flatbuffer):
    report = edgetpu_report(reference_flatbuffer)
    first = report["first_cpu_op"]
    assert first is not None and first["op"] in ("RESHAPE", "TRANSPOSE")  # the 4-D unfold of stage 3
    statuses = [op["status"] for op in report["ops"]]
    assert statuses[: first["index"]] == [MAPPED] * first["index"]
    assert all(status != MAPPED for status in statuses[first["index"] :])
    assert 0.0 < report["mac_share_on_tpu"] < 1.0
    assert any("Softmax input" in reason for reason in report["unsupported"].values())


def test_an_op_falling_back_to_the_cpu_is_refused_and_nothing_written(reference_flatbuffer, tmp_path):
    with pytest.raises(TargetError, match="cannot run on the Edge TPU") as raised:
        export_flatbuffer(reference_flatbuffer, str(tmp_path), "reference")
    assert raised.value.report["first_cpu_op"] is not None
    assert list(tmp_path.iterdir()) == []
    report = export_flatbuffer(reference_flatbuffer, str(tmp_path), "reference", allow_cpu_fallback=True)
    assert os.path.exists(report["files"]["tflite"]) and os.path.exists(report["files"]["report"])


def test_float_io_is_refused(qat_model, tmp_path):
    with pytest.raises(ValueError, match="int8 or uint8"):
        export(qat_model, str(tmp_path), io_type="float32")


def test_compiler_log_parser_reads_recorded_logs():
    with open(os.path.join(DATA, "edgetpu_compiler_issue342.log")) as f:
        table = parse_compiler_log(f.read())
    assert (table["ops_on_tpu"], table["ops_on_cpu"], table["ops_total"]) == (2, 153, 155)
    assert ("TRANSPOSE", 70, "Operation not supported") in table["rows"]
    assert ("PAD", 1, MAPPED) in table["rows"]
    with open(os.path.join(DATA, "edgetpu_compiler_issue433_header.log")) as f:
        header = parse_compiler_log(f.read())
    assert header["version"] == "16.0.384591198" and header["subgraphs"] == 1
    assert (header["ops_on_tpu"], header["ops_on_cpu"], header["ops_total"]) == (1, 190, 191)


def test_compiler_log_parser_rejects_inconsistent_or_foreign_text():
    with open(os.path.join(DATA, "edgetpu_compiler_issue342.log")) as f:
        text = f.read()
    with pytest.raises(ValueError, match="Inconsistent"):
        parse_compiler_log(text.replace("run on Edge TPU: 2", "run on Edge TPU: 5"))
    with pytest.raises(ValueError, match="Not an edgetpu_compiler log"):
        parse_compiler_log("Segmentation fault")


def test_batch_norm_attention_option_has_no_normalization_ops(images, tmp_path):
    model = MobileViTv2(0.5, weights=None, input_shape=(SIZE, SIZE, 3), classes=10, attention_norm="batch_norm_2d")
    model = randomize_keras_model(model, seed=4)
    report = export(model, str(tmp_path), "bn", calibration_images=images[:16], sample_images=images[:16])
    names = [op["op"] for op in report["ops"]]
    # Each BatchNorm is one depthwise op: only the 3 final norms (one per
    # MobileViTv2 block, 2 MEANs each) and the global pool keep MEAN/RSQRT.
    assert names.count("RSQRT") == 3 and names.count("MEAN") == 3 * 2 + 1
    assert report["first_cpu_op"] is None
    assert report["rewrite_check"]["max_abs_difference"] == 0.0


@pytest.fixture(scope="module")
def small_float_model():
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


@pytest.mark.parametrize(
    "batch_size, io_type, problems",
    [
        (1, "int8", []),
        (1, "uint8", []),
        (
            2,
            "int8",
            [
                "input 'serving_default_image:0' has shape [2, 32, 32, 3]: the Edge TPU needs batch 1",
                "has shape [2, 5]: the Edge TPU needs batch 1",
            ],
        ),
        (
            1,
            "float32",
            [
                "input 'serving_default_image:0' is float32: the Edge TPU takes int8 or uint8",
                "is float32: the Edge TPU takes int8 or uint8",
            ],
        ),
    ],
    ids=["int8", "uint8", "batch_2", "float_io"],
)
def test_edgetpu_io_check_refuses_batch_and_float_interfaces(small_float_model, batch_size, io_type, problems):
    from quantization.targets.edgetpu_ops import check_edgetpu_io

    calibration = np.random.RandomState(0).rand(4, 32, 32, 3).astype("float32") * 255
    flatbuffer = convert(small_float_model, "ptq_int8", io_type, calibration, batch_size=batch_size)
    found = check_edgetpu_io(flatbuffer)
    assert len(found) == len(problems), found
    for expected, message in zip(problems, found):
        assert expected in message, found
