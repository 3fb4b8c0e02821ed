"""`python -m benchmarks.int8_efficiency --tiny` end to end, and its rates on known figures.

The tiny run converts MobileNetV2 and MobileViTv2-0.5 (PTQ, QAT and the QAT
Edge TPU graph) at 64x64 and times them in turn; nothing timed is checked,
only that the rows are there and that every rate and fraction is the
quotient of the figures reported beside it.
"""

import json
import os
import sys

import pytest
from benchmark_runs import run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.int8_efficiency import OURS_VARIANTS  # noqa: E402
from benchmarks.int8_efficiency import markdown  # noqa: E402
from benchmarks.int8_efficiency import width_row  # noqa: E402


def _info(median_ms=None):
    info = {"bytes": 2_000_000, "route": "test", "float_tensors_inside": 0, "float_ops": [], "ops": 10}
    return dict(info, op_counts={}, path="/tmp/x.tflite", timing={"median_ms": median_ms} if median_ms else None)


def _timings(ours_ms, mobilenet_ms):
    def timing(median):
        return {"median_ms": median, "p25_ms": median, "p75_ms": median, "load_average": 0.5}

    timings = {("ours", variant): timing(value) for variant, value in zip(OURS_VARIANTS, ours_ms)}
    timings[("mobilenet_v2", "ptq_int8")] = timing(mobilenet_ms)
    return timings


OURS = {
    "name": "ours",
    "image_size": 256,
    "params": 1_400_000,
    "macs": 400_000_000,
    "tflite": {variant: _info() for variant in OURS_VARIANTS},
}
MOBILENET = {"name": "mobilenet_v2", "image_size": 224, "params": 3_500_000, "macs": 300_000_000}


def test_rates_and_fractions_are_quotients():
    row = width_row(0.5, OURS, MOBILENET, _timings((10.0, 8.0, 16.0), 5.0))
    assert row["mobilenet_v2"]["gmacs_per_s"] == pytest.approx(60.0)
    assert [row[v]["gmacs_per_s"] for v in OURS_VARIANTS] == pytest.approx([40.0, 50.0, 25.0])
    assert [row[v]["fraction_of_mobilenet"] for v in OURS_VARIANTS] == pytest.approx([2 / 3, 5 / 6, 5 / 12])
    assert "path" not in row["ptq_int8"]
    result = {
        "config": {"image_size": 256, "threads": 2, "repeats": 20, "tiny": False},
        "load_average_end": 0.5,
        "target_fraction": 0.9,
        "mobilenet_v2": dict(MOBILENET, label="MobileNetV2", tflite=_info()),
        "rows": [row],
    }
    text = markdown(result)
    cells = "| 10.0 [10.0-10.0] | 8.00 [8.00-8.00] | 16.0 [16.0-16.0] | 5.00 [5.00-5.00] |"
    assert f"| 0.5 | 0.400 {cells} 40.00 | 50.00 | 25.00 | 60.00 | 67% | 83% | 42% |" in text
    assert "- PTQ int8: at or above 90% of MobileNetV2's rate: no width; below: 0.5 (67%)" in text


def _result_with_load(load_average, **recorded):
    timings = _timings((10.0, 8.0, 16.0), 5.0)
    for timing in timings.values():
        timing["load_average"] = load_average
    return dict(
        recorded,
        config={"image_size": 256, "threads": 2, "repeats": 20, "tiny": False},
        load_average_end=load_average,
        target_fraction=0.9,
        mobilenet_v2=dict(MOBILENET, label="MobileNetV2", tflite=_info()),
        rows=[width_row(0.5, OURS, MOBILENET, timings)],
    )


def test_busy_cells_are_judged_by_the_cpus_of_the_run_not_of_the_reader():
    # A load of 3 is busy for the 2 CPUs that ran it, whatever machine renders the report.
    assert "10.0 [10.0-10.0]†" in markdown(_result_with_load(3.0, cpus=2))
    on_16 = markdown(_result_with_load(3.0, cpus=16))
    assert "†" not in on_16.split("\n\n† ")[0] and "on 16 CPUs" in on_16
    unrecorded = markdown(_result_with_load(3.0))
    assert "10.0 [10.0-10.0] |" in unrecorded and "not judged: this run did not record its CPU count" in unrecorded
    assert "on an unrecorded number of CPUs" in unrecorded


def test_an_untimed_model_has_no_rate():
    timings = _timings((10.0, 8.0, 16.0), 5.0)
    timings[("ours", "qat_int8")] = {"reason": "RuntimeError: refused"}
    row = width_row(0.5, OURS, MOBILENET, timings)
    assert row["qat_int8"]["gmacs_per_s"] is None and row["qat_int8"]["fraction_of_mobilenet"] is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("int8_efficiency")
    completed = run_benchmark("benchmarks.int8_efficiency", "--tiny", "--output_dir", output_dir)
    with open(output_dir / "int8_efficiency.json") as f:
        result = json.load(f)
    return result, (output_dir / "int8_efficiency.md").read_text(), completed


@pytest.mark.slow  # a full tiny run: minutes on 2 cores
def test_tiny_run_writes_the_rows(tiny_run):
    result, text, completed = tiny_run
    assert "[bench] timing 3 MobileViTv2-0.5 models in turn with MobileNetV2" in completed.stderr
    assert [row["width"] for row in result["rows"]] == [0.5]
    assert text in completed.stdout
    assert "| 0.5 |" in text and "| keras.applications MobileNetV2 (alpha 1.0) |" in text
    assert result["mobilenet_v2"]["macs"] > 0 and "path" not in result["mobilenet_v2"]["tflite"]


@pytest.mark.slow  # a full tiny run: minutes on 2 cores
def test_tiny_run_rates_are_the_quotients_of_the_times(tiny_run):
    result, text, _ = tiny_run
    (row,) = result["rows"]
    mobilenet = row["mobilenet_v2"]
    expected = result["mobilenet_v2"]["macs"] / (mobilenet["timing"]["median_ms"] / 1e3) / 1e9
    assert mobilenet["gmacs_per_s"] == pytest.approx(expected, rel=1e-12)
    for variant in OURS_VARIANTS:
        figures = row[variant]
        rate = row["macs"] / (figures["timing"]["median_ms"] / 1e3) / 1e9
        assert figures["gmacs_per_s"] == pytest.approx(rate, rel=1e-12)
        assert figures["fraction_of_mobilenet"] == pytest.approx(rate / mobilenet["gmacs_per_s"], rel=1e-12)
        assert f"{100 * figures['fraction_of_mobilenet']:.0f}%" in text
        assert isinstance(figures["float_tensors_inside"], int) and "path" not in figures
