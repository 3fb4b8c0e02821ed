"""An SSDLite detector ending in TFLite_Detection_PostProcess on the TFLite
Micro and Android targets: the real TFLM interpreter, detection agreement,
the GPU delegate's partitions and refusals."""

import os

import numpy as np
import pytest

pytest.importorskip("tflite_micro")
pytest.importorskip("ai_edge_litert")

from conftest import randomize_keras_model  # noqa: E402

from keras_mobilevitv2.detection import SSDLite  # noqa: E402
from quantization import targets  # noqa: E402
from quantization.detection_export import PostProcess  # noqa: E402
from quantization.targets import TargetError  # noqa: E402
from quantization.targets import android  # noqa: E402
from quantization.targets import micro  # noqa: E402
from quantization.targets.detections import detection_agreement  # noqa: E402
from quantization.targets.micro_checks import check_micro_compatibility  # noqa: E402
from quantization.targets.micro_runtime import measure_arena  # noqa: E402

SIZE = 128
POSTPROCESS_OP = "CUSTOM:TFLite_Detection_PostProcess"
SETTINGS = PostProcess(max_detections=10, score_threshold=0.2)
# TFLite's optimized int8 kernels round a few values one step away from
# TFLM's reference kernels; with random weights many anchors have nearly
# equal scores, so that reorders a few near-ties and NMS keeps other boxes
# (93% of the detections match on this machine; the target's default minimum
# is 90%). The post-processing itself is checked exactly (`postprocess_kernel`).
MIN_AGREEMENT = 0.75


@pytest.fixture(scope="module")
def detector():
    return randomize_keras_model(SSDLite(0.5, num_classes=4, input_shape=(SIZE, SIZE, 3)), seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(10, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def micro_export(detector, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro_detector")
    report = targets.export(
        "micro",
        detector,
        str(folder),
        "ssd",
        calibration_images=images[:8],
        sample_images=images[:6],
        postprocess=SETTINGS,
        min_detection_agreement=MIN_AGREEMENT,
    )
    return folder, report


@pytest.fixture(scope="module")
def android_export(detector, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("android_detector")
    report = android.export(
        detector,
        str(folder),
        "ssd",
        calibration_images=images[:8],
        sample_images=images[:3],
        io_type="int8",
        postprocess=SETTINGS,
        warmup=1,
        repeats=3,
    )
    return folder, report


def _detections(rows, count, d=4):
    """One image's four outputs from `rows` of (ymin, xmin, class, score), padded to `d` detections."""
    boxes = np.zeros((1, d, 4), np.float32)
    classes, scores = np.zeros((1, d), np.float32), np.zeros((1, d), np.float32)
    for i, (y, x, label, score) in enumerate(rows):
        boxes[0, i] = [y, x, y + 0.2, x + 0.2]
        classes[0, i], scores[0, i] = label, score
    return [boxes, classes, scores, np.array([count], np.float32)]


def test_detection_agreement_matches_detections_as_sets():
    expected = _detections([(0.1, 0.1, 1, 0.9), (0.5, 0.5, 2, 0.8), (0.3, 0.6, 0, 0.5)], 3)
    reordered = _detections([(0.5, 0.5, 2, 0.8), (0.1, 0.1, 1, 0.9), (0.3, 0.6, 0, 0.5)], 3)
    result = detection_agreement(expected, reordered)
    assert result["detection_agreement"] == 1.0 and result["count_agreement"] == 1.0
    assert result["identical_images"] == 0.0  # the same detections in another order
    # A box moved past the tolerance, a class changed, a score moved past it, one detection missing:
    changed = _detections([(0.1, 0.13, 1, 0.9), (0.5, 0.5, 1, 0.8), (0.3, 0.6, 0, 0.45)], 3)
    assert detection_agreement(expected, changed)["matched"] == 0
    shorter = _detections([(0.1, 0.11, 1, 0.91), (0.5, 0.5, 2, 0.8)], 2)
    result = detection_agreement(expected, shorter)
    assert result["matched"] == 2 and result["detection_agreement"] == pytest.approx(2 / 3)
    assert result["count_agreement"] == 0.0 and result["max_box_difference"] == pytest.approx(0.01, abs=1e-6)
    assert detection_agreement(_detections([], 0), _detections([], 0))["detection_agreement"] == 1.0


def test_micro_runs_the_detector_and_agrees_with_tflite(micro_export):
    folder, report = micro_export
    assert report["fits"] and report["problems"] == []
    assert report["detector"]["python_resolver_registers_postprocess"] is True
    assert report["input"]["dtype"] == "INT8"
    assert [(o["dtype"], o["shape"]) for o in report["outputs"]] == [
        ("FLOAT32", [1, 10, 4]),
        ("FLOAT32", [1, 10]),
        ("FLOAT32", [1, 10]),
        ("FLOAT32", [1]),
    ]
    assert report["compatibility"]["detector"] and report["compatibility"]["float_tensors_inside"] == []
    registered = {op["op"]: op["method"] for op in report["ops_to_register"]}
    assert registered[POSTPROCESS_OP] == "AddDetectionPostprocess"
    assert "resolver.AddDetectionPostprocess()" in (folder / "ssd.micro.h").read_text()
    model = (folder / "ssd.micro.int8.tflite").read_bytes()
    assert report["flash_bytes"] == len(model) and measure_arena(model) == report["arena_bytes"]
    assert 100_000 < report["arena_bytes"] < 4 * 2**20, report["arena_bytes"]
    # TFLM's kernel alone, on TFLite's per-anchor values, gives TFLite's detections exactly.
    kernel = report["postprocess_kernel"]
    assert kernel["identical_images"] == 1.0 and kernel["detection_agreement"] == 1.0
    assert kernel["expected_detections"] > 0
    # Its arena alone is the scratch the kernel asks for, plus its inputs and outputs.
    detector = report["detector"]
    assert detector["anchors"] == 520 and detector["classes"] == 3
    scratch, inputs = detector["postprocess_scratch_bytes"], 2 * 520 * 4 * 4
    assert scratch + inputs < detector["postprocess_arena_bytes"] < scratch + inputs + 4096
    detections = report["detections"]
    assert detections["images"] == 6 and detections["expected_detections"] > 0
    assert MIN_AGREEMENT <= detections["detection_agreement"] <= 1.0
    assert detections["max_box_difference"] <= detections["box_tolerance"]
    assert report["anchor_agreement"]["best_class_agreement"] > 0.8
    text = micro.format_report(report)
    assert "TFLite_Detection_PostProcess" in text and "identical detections on 100% of the images" in text


def test_micro_refuses_detections_that_disagree(micro_export, images, tmp_path):
    folder, report = micro_export
    assert report["detections"]["identical_images"] < 1.0  # the runtimes round a few values differently
    model = (folder / "ssd.micro.int8.tflite").read_bytes()
    exact = {"min_detection_agreement": 1.0, "box_tolerance": 0.0, "score_tolerance": 0.0}
    with pytest.raises(TargetError, match=r"agree on only .* of the detections") as error:
        micro.export_flatbuffer(model, str(tmp_path / "out"), "ssd", images[:6], **exact)
    assert "On the same per-anchor values the post-processing gives TFLite's detections exactly" in str(error.value)
    assert error.value.report["detections"]["detection_agreement"] < 1.0 and not (tmp_path / "out").exists()


def test_micro_refuses_a_float_detector_and_bad_arguments(detector, images, android_export, tmp_path):
    _, report = android_export
    with open(report["files"]["float16"], "rb") as f:
        float16 = f.read()
    check = check_micro_compatibility(float16)
    assert check["detector"] and not check["compatible"]
    with pytest.raises(TargetError) as error:
        micro.export_flatbuffer(float16, str(tmp_path / "out"), "float_ssd", images[:1])
    message = str(error.value)
    assert "is FLOAT32; the micro target needs an INT8 input" in message
    assert "float tensor(s) inside the model" in message and "up to the detection post-processing" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="takes int8 input and output only"):
        targets.export("micro", detector, str(tmp_path / "out"), calibration_images=images, io_type="float32")
    with pytest.raises(ValueError, match="A float detector needs calibration_images"):
        targets.export("micro", detector, str(tmp_path / "out"), sample_images=images[:2])
    assert not (tmp_path / "out").exists()


def test_android_report_keeps_the_postprocessing_on_the_cpu_tail(android_export):
    folder, report = android_export
    assert sorted(os.listdir(folder)) == sorted(
        [
            "ssd.android.float16.tflite",
            "ssd.android.float16.audit.json",
            "ssd.android.int8.tflite",
            "ssd.android.int8.audit.json",
            "ssd.android.report.json",
        ]
    )
    float16, int8 = report["models"]
    assert (float16["mode"], int8["mode"]) == ("float16", "ptq_int8")
    for model in (float16, int8):
        gpu = model["gpu"]
        last = gpu["total_ops"] - 1
        assert gpu["detection_postprocess"] == {"index": last, "on_gpu": False, "cpu_tail": True}
        assert gpu["unsupported"] == [
            {"index": last, "op": POSTPROCESS_OP, "reason": f"{POSTPROCESS_OP} is not supported by the GPU delegate"}
        ]
        assert gpu["supported_ops"] == last and gpu["gpu_partitions"] == gpu["cpu_partitions"] == 1
        assert gpu["partitions"] == [
            {"on_gpu": True, "ops": last, "first": 0, "last": last - 1},
            {"on_gpu": False, "ops": 1, "first": last, "last": last},
        ]
        assert model["size_bytes"] == os.path.getsize(model["path"])
        assert 0 < model["xnnpack"]["min_ms"] <= model["xnnpack"]["median_ms"]
    assert int8["gpu"]["int8"] and not float16["gpu"]["int8"]
    assert int8["agreement"]["reference"] == "float16" and int8["agreement"]["images"] == 3
    text = android.format_report(report)
    assert f"TFLite_Detection_PostProcess (op #{int8['gpu']['total_ops'] - 1}) runs on the CPU, the CPU tail" in text
    assert "(1 partition boundary)" in text and f"1 x {POSTPROCESS_OP}" not in text  # not listed as a fallback
