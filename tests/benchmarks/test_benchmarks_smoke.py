"""`python -m benchmarks.run --tiny` end to end: files written, rows present.

Runs the benchmark in a subprocess, as users do (PyTorch and kecam run in
worker processes of their own anyway). Nothing here is timed: the figures
of a tiny run are not benchmarks. An implementation whose library is not
installed must show as n/a, not fail the run.
"""

import importlib.util
import json
import os
import time

import pytest
from benchmark_runs import run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUR_RUNTIMES = ("eager", "graph", "xla", "tflite_float", "tflite_int8")
# The module each implementation needs: without it its rows must be n/a.
MODULES = {
    "keras_mobilevitv2": "keras",
    "timm": "timm",
    "kimm": "kimm",
    "kecam": "keras_cv_attention_models",
    "mobilenet_v2": "keras",
    "mobilenet_v3_large": "keras",
}


def installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark_results")
    start = time.perf_counter()
    completed = run_benchmark("benchmarks.run", "--tiny", "--output_dir", output_dir)
    with open(output_dir / "results.json") as f:
        results = json.load(f)
    markdown = (output_dir / "results.md").read_text()
    return {
        "dir": output_dir,
        "results": results,
        "markdown": markdown,
        "stdout": completed.stdout,
        "seconds": time.perf_counter() - start,
    }


def rows_of(results, implementation):
    return [row for row in results["latency"] if row["implementation"] == implementation]


def test_writes_tables_json_and_plot(tiny_run):
    assert "## 1. Inference latency" in tiny_run["stdout"]  # the tables are printed too
    for title in (
        "## 1. Inference latency",
        "## 2. Separable self-attention",
        "## 3. Model size per width",
        "## 4. Training throughput",
        "### This package / timm",
        "### int8 / float TFLite",
    ):
        assert title in tiny_run["markdown"]
    assert "Threads: " in tiny_run["markdown"]
    assert tiny_run["results"]["settings"]["tiny"] is True
    if installed("matplotlib"):
        assert (tiny_run["dir"] / "results.png").stat().st_size > 10_000
    else:
        assert "no plot" in tiny_run["results"]["plot"]


def test_our_runtimes_are_measured(tiny_run):
    rows = {row["runtime"]: row for row in rows_of(tiny_run["results"], "keras_mobilevitv2")}
    for runtime in OUR_RUNTIMES:
        assert rows[runtime]["status"] == "ok", rows[runtime]["reason"]
        timing = rows[runtime]["timing"]
        assert timing["runs"] >= 1 and timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
    int8 = rows["tflite_int8"]["tflite"]
    assert int8["float_tensors_inside"] == 0  # the requirement for our int8 model
    assert int8["bytes"] < rows["tflite_float"]["tflite"]["bytes"]
    assert "| keras_mobilevitv2 (this package) | 0.5 | 1 | 64 |" in tiny_run["markdown"]


@pytest.mark.parametrize(
    "implementation, runtime",
    [
        ("timm", "torch"),
        ("kimm", "graph"),
        ("kecam", "graph"),
        ("mobilenet_v2", "graph"),
        ("mobilenet_v3_large", "graph"),
    ],
)
def test_other_implementations_measured_or_na(tiny_run, implementation, runtime):
    rows = rows_of(tiny_run["results"], implementation)
    assert rows, f"no rows for {implementation}"
    row = next(row for row in rows if row["runtime"] == runtime)
    if installed(MODULES[implementation]):
        assert row["status"] == "ok", row["reason"]
    else:
        assert row["status"] == "n/a" and row["reason"]


def test_graph_modes_and_timm_are_timed_in_turn(tiny_run):
    rows = {row["implementation"]: row for row in tiny_run["results"]["latency"] if row["runtime"].endswith("_in_turn")}
    assert {key: row["runtime"] for key, row in rows.items()} == {
        "keras_mobilevitv2": "graph_in_turn",
        "kimm": "graph_in_turn",
        "kecam": "graph_in_turn",
        "timm": "torch_in_turn",
    }
    for key, row in rows.items():
        if installed(MODULES[key]):
            assert row["status"] == "ok", row["reason"]
            assert row["timing"]["runs"] >= 1
        else:  # that worker failed to start: its row says why, the others are timed
            assert row["status"] == "n/a" and row["reason"]
    if installed("timm"):
        assert " = " in tiny_run["markdown"].split("graph / timm, timed in turn (ms)")[1].split("###")[0]
    if installed("kimm"):
        other_keras = tiny_run["markdown"].split("### This package / the fastest other Keras")[1].split("###")[0]
        assert "| graph, timed in turn |" in other_keras


def test_kecam_under_keras3_is_reported(tiny_run):
    rows = rows_of(tiny_run["results"], "kecam_keras3")
    assert rows
    # kecam is written for tf.keras 2: under Keras 3 either it works, or every
    # row says why not (one collapsed row in the table).
    if all(row["status"] == "n/a" for row in rows):
        assert "| kecam (Keras 3) | all | all |" in tiny_run["markdown"]


def test_attention_rows(tiny_run):
    section = tiny_run["results"]["attention"]
    points = {(row["kind"], row["tokens"]) for row in section["rows"] if row["status"] == "ok"}
    assert points == {(kind, tokens) for kind in ("separable", "multi_head") for tokens in (64, 256)}
    assert set(section["growth"]) == {"separable", "multi_head"}


def test_size_rows(tiny_run):
    section = tiny_run["results"]["size"]
    assert section["peak"]["gmacs_per_s"] > 0
    rows = {row["width"]: row for row in section["rows"]}
    assert set(rows) == {0.5, 0.75}
    assert rows[0.5]["params"] == 1_378_369  # same count as timm's mobilevitv2_050
    for row in rows.values():
        assert row["macs"] > 0 and row["graph_timing"]["median_ms"] > 0
        if installed("timm"):  # two independent counters of the same network
            assert row["timm_macs"] == pytest.approx(row["macs"], rel=0.02)
    assert rows[0.5]["tflite_int8_bytes"] > 0  # reused from the latency section


def test_training_section(tiny_run):
    section = tiny_run["results"]["training"]
    if not tiny_run["results"]["environment"]["gpus"]:
        assert section["reason"] == "skipped: no GPU"
        assert "skipped: no GPU" in tiny_run["markdown"]
