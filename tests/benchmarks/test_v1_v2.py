"""`python -m benchmarks.v1_v2 --tiny` end to end, and its table on known figures.

The tiny run converts the first pair (MobileViT-XS in a tf_keras worker,
MobileViTv2-0.75 here) at 64x64 and times it; nothing timed is checked, only
that every row is there and that each ratio is the quotient of the times it
sits beside.
"""

import json
import os
import sys

import pytest
from benchmark_runs import run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.v1_v2 import PRECISIONS  # noqa: E402
from benchmarks.v1_v2 import markdown  # noqa: E402
from benchmarks.v1_v2 import pair_rows  # noqa: E402
from benchmarks.v1_v2 import width_text  # noqa: E402

PAIR = "MobileViT-XS (kecam) vs MobileViTv2-0.75 (this package)"


def _record(name, label, implementation, medians, macs):
    tflite = {}
    for variant, median in medians.items():
        tflite[variant] = {
            "bytes": 1_000_000,
            "route": "test",
            "float_tensors_inside": 0 if variant != "float32" else 10,
            "float_ops": [],
            "ops": 100,
            "op_counts": {"RESHAPE": 4, "BATCH_MATMUL": 2},
            "timing": {"median_ms": median, "p25_ms": median, "p75_ms": median, "load_average": 0.5}
            if median
            else None,
        }
    return {
        "name": name,
        "label": label,
        "implementation": implementation,
        "image_size": 256,
        "params": 2_000_000,
        "macs": macs,
        "macs_by_kind": {"3x3 conv": macs // 4, "attention (activation x activation)": macs // 100},
        "tflite": tflite,
    }


def test_rows_divide_v1_by_v2_and_the_table_shows_them():
    v1 = _record("v1", "MobileViT-XS (kecam)", "kecam", {"float32": 30.0, "ptq_int8": 24.0}, 700_000_000)
    v2 = _record(
        "v2",
        "MobileViTv2-0.75 (this package)",
        "keras_mobilevitv2",
        {"float32": 20.0, "ptq_int8": 8.0, "qat_int8": 6.0},
        1_000_000_000,
    )
    rows = pair_rows(v1, v2)
    assert [row["precision"] for row in rows] == [precision for precision, _, _ in PRECISIONS]
    assert [row["v1_over_v2"] for row in rows] == [1.5, 3.0, 4.0]
    result = {
        "config": {"image_size": 256, "threads": 2, "repeats": 20, "tiny": False},
        "load_average_end": 0.5,
        "pairs": [{"v1": v1, "v2": v2}],
        "rows": rows,
    }
    text = markdown(result)
    assert f"| {PAIR} | int8 (v2 QAT) | 24.0 [24.0-24.0] | 6.00 [6.00-6.00] | 4.00x | 3.2x |" in text
    assert "v1 has 0.70x v2's MACs" in text
    assert "int8 (PTQ) 4.29x" in text  # time per MAC: 3.0 / 0.7
    assert (
        "MobileViT-XS (kecam) float / PTQ int8 time 1.25x, its int8 graph holding 2 BATCH_MATMUL and 0 SOFTMAX" in text
    )


def test_a_missing_time_leaves_the_ratio_empty():
    v1 = _record("v1", "MobileViT-XS (kecam)", "kecam", {"float32": 30.0, "ptq_int8": None}, 7)
    v2 = _record("v2", "MobileViTv2-0.75", "keras_mobilevitv2", {"float32": 20.0, "ptq_int8": 8.0, "qat_int8": 6.0}, 10)
    assert [row["v1_over_v2"] for row in pair_rows(v1, v2)] == [1.5, None, None]


def test_width_text():
    assert [width_text(w) for w in (0.5, 0.75, 1.0, 2.0)] == ["0.5", "0.75", "1.0", "2.0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("v1_v2")
    completed = run_benchmark("benchmarks.v1_v2", "--tiny", "--output_dir", output_dir)
    with open(output_dir / "v1_v2.json") as f:
        result = json.load(f)
    return result, (output_dir / "v1_v2.md").read_text(), completed


@pytest.mark.slow  # a full tiny run: minutes on 2 cores
def test_tiny_run_writes_every_row(tiny_run):
    result, text, completed = tiny_run
    assert "[bench] timing 5 TFLite models in turn" in completed.stderr
    assert [(row["pair"], row["precision"]) for row in result["rows"]] == [(PAIR, p) for p, _, _ in PRECISIONS]
    for precision, _, _ in PRECISIONS:
        assert f"| {PAIR} | {precision} |" in text
    assert text in completed.stdout  # printed as well as written
    assert "## Why the ratio is not the paper's 3.2x" in text


@pytest.mark.slow  # a full tiny run: minutes on 2 cores
def test_tiny_run_ratios_are_the_quotients_of_the_times(tiny_run):
    result, text, _ = tiny_run
    for row in result["rows"]:
        assert row["v1_ms"] > 0 and row["v2_ms"] > 0
        assert row["v1_over_v2"] == pytest.approx(row["v1_ms"] / row["v2_ms"], rel=1e-12)
        assert f"| {row['v1_over_v2']:.2f}x | 3.2x |" in text


@pytest.mark.slow  # a full tiny run: minutes on 2 cores
def test_tiny_run_reports_the_models(tiny_run):
    result, text, _ = tiny_run
    (pair,) = result["pairs"]
    assert set(pair["v1"]["tflite"]) == {"float32", "ptq_int8"}
    assert set(pair["v2"]["tflite"]) == {"float32", "ptq_int8", "qat_int8"}
    for record in (pair["v1"], pair["v2"]):
        assert record["params"] > 1_000_000 and record["macs"] > 0
        assert sum(record["macs_by_kind"].values()) == record["macs"]
        for info in record["tflite"].values():
            assert "path" not in info  # temporary files are not reported
            assert isinstance(info["float_tensors_inside"], int)
    # kecam's MobileViT-XS: 2.33 M parameters, as the paper's 2.3 M.
    assert round(pair["v1"]["params"] / 1e6, 1) == 2.3
    assert "| MobileViT-XS (kecam) | 2.33 |" in text
