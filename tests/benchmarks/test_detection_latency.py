"""The detection latency benchmark: its MobileNetV2-SSDLite, its table, and a
`--quick` run end to end (nothing timed is checked: a smoke run's figures
are not benchmarks)."""

import json
import os
import sys

import keras
import numpy as np
import pytest
from benchmark_runs import run_benchmark

# `benchmarks` is imported from the repository (not part of the wheel), after the installed packages.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.detection_latency import add_int8_ratios  # noqa: E402
from benchmarks.detection_latency import markdown  # noqa: E402
from keras_mobilevitv2.detection import MOBILENET_V2_LEVELS  # noqa: E402
from keras_mobilevitv2.detection import SSDLite  # noqa: E402
from keras_mobilevitv2.detection import model_anchors  # noqa: E402

# keras.applications.MobileNetV2(include_top=False), width 1.0: its trainable parameters.
MOBILENET_V2_TRAINABLE = 2_223_872
# The detector on top, counted by hand (81 classes: 85 outputs per anchor; 6 anchors per location, 4 at the
# global level). Extra levels: separable 1280->256 (11520 + 2560 + 327680 + 512), 256->128 (2304 + 512 +
# 32768 + 256), 128->128 (1152 + 256 + 16384 + 256), global 1x1 128->64 (8192). Heads: 576->512 projection
# (294912 + 1024), depthwise (4608 + 1024), 512->510 (261630); 1280->256 projection (327680 + 512), depthwise
# (2304 + 512), 256->510 (131070); 256: depthwise (2304 + 512), 131070; two 128 heads: 1152 + 256 + 65790
# each; global 64->340 (22100).
SSDLITE_ON_MOBILENET_V2 = 404_352 + 1_315_658


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _mobilenet_v2(size):
    return keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))


def test_mobilenet_v2_ssdlite_has_the_same_levels_and_heads():
    model = SSDLite(_mobilenet_v2(320), backbone_levels=MOBILENET_V2_LEVELS)
    assert _trainable(model) == MOBILENET_V2_TRAINABLE + SSDLITE_ON_MOBILENET_V2
    assert model.output["box_deltas"].shape == (None, 3232, 4) and len(model_anchors(model)) == 3232
    assert model.get_layer("head0_proj").input.shape == (None, 20, 20, 576)  # block 13's expansion
    assert model.get_layer("head1_proj").input.shape == (None, 10, 10, 1280)  # out_relu


@pytest.mark.parametrize(
    "backbone, levels, message",
    [
        ("mobilenet", None, "has no layer 'stage4_mvit'.*backbone_levels=MOBILENET_V2_LEVELS"),
        ("mobilenet", {16: "block_6_expand_relu", 32: "out_relu"}, r"outputs 16x16 at input 128x128, not output "),
        ("mobilenet", {16: "block_13_expand_relu", 32: "top"}, "no layer 'top', which `backbone_levels` names for"),
        ("mobilenet", {32: "out_relu"}, "takes output stride 16 from the backbone"),
        ("mobilenet", {"16": "block_13_expand_relu"}, "must map output strides"),
        (0.5, MOBILENET_V2_LEVELS, "`backbone_levels` names layers of a backbone model"),
    ],
)
def test_backbone_level_errors(backbone, levels, message):
    backbone = _mobilenet_v2(128) if backbone == "mobilenet" else backbone
    with pytest.raises(ValueError, match=message):
        SSDLite(backbone, input_shape=(128, 128, 3), backbone_levels=levels)


def _row(model, runtime, median_ms=None, reason=""):
    timing = {"median_ms": median_ms, "p25_ms": median_ms, "p75_ms": median_ms, "load_average": 0.0}
    return {
        "model": model,
        "label": model,
        "includes": "network only",
        "runtime": runtime,
        "params": 2_000_000,
        "macs": None,
        "size_mb": 1.5 if median_ms else None,
        "float_tensors_inside": 0 if runtime.endswith("int8") and median_ms else None,
        "timing": timing if median_ms else None,
        "status": "ok" if median_ms else "failed",
        "reason": reason,
    }


def test_table_has_the_int8_ratio_and_the_reasons():
    rows = [_row("a", "TFLite float32", 20.0), _row("a", "TFLite int8", 5.0), _row("b", "-", reason="no keras-hub")]
    result = {"rows": add_int8_ratios(rows), "image_size": 320, "threads": 2, "calibration_images": 8}
    result.update(quick=False, command="python -m benchmarks.detection_latency", machine="2 CPU cores", cpus=2)
    text = markdown(result)
    assert rows[1]["int8_over_float"] == 0.25
    assert "| a | network only | 2.00 | - | TFLite int8 | 1.50 | 5.00 [5.00-5.00] | 0.25x | 0 |" in text
    assert "failed: no keras-hub" in text and "smoke run" not in text


def test_quick_run_writes_the_table(tmp_path):
    output = tmp_path / "detection_latency"
    completed = run_benchmark("benchmarks.detection_latency", "--quick", "--output", output, timeout=600)
    assert "[bench] [1/1] SSDLite MobileViTv2-0.5" in completed.stderr  # progress
    result = json.loads(output.with_suffix(".json").read_text())
    rows = {row["runtime"]: row for row in result["rows"]}
    assert set(rows) == {"TFLite float32", "TFLite int8"}
    assert all(row["status"] == "ok" and row["timing"]["runs"] >= 1 for row in rows.values()), result["rows"]
    assert rows["TFLite int8"]["float_tensors_inside"] == 0
    assert rows["TFLite int8"]["size_mb"] < rows["TFLite float32"]["size_mb"] / 2
    assert rows["TFLite int8"]["int8_over_float"] > 0 and rows["TFLite float32"]["params"] == 2_035_395
    text = output.with_suffix(".md").read_text()
    assert text in completed.stdout and "TFLite_Detection_PostProcess" in text and "smoke run" in text
