"""`python -m benchmarks.qat_graph`: its ratios, and a tiny run end to end."""

import json

import pytest

from benchmarks import qat_graph


def _result(ms):
    return {
        "image_size": 64,
        "threads": 2,
        "cpus": 2,
        "command": "python -m benchmarks.qat_graph",
        "cells": [{"width": 0.5, "batch": 1, "ms": ms, "p25_p75_ms": {}, "load_average": 0.5}],
    }


def test_the_ratios_are_the_quotients_of_the_times():
    ms = {"float32": 8.0, "ptq_int8": 4.0, "qat_int8": 3.0, "qat_int8_unmerged": 5.0}
    row = qat_graph.markdown(_result(ms)).splitlines()[-1]
    assert row == "| 0.5 | 1 | 8 | 4 | 3 | 5 | 0.75x | 0.38x | 0.60x | 0.50 |"


@pytest.mark.slow  # four conversions and their timing: about a minute on 2 cores
def test_tiny_run_times_the_four_models(tmp_path):
    output = str(tmp_path / "qat_graph")
    arguments = ["--widths", "0.5", "--batch_sizes", "1", "--image_size", "64", "--repeats", "2"]
    qat_graph.main(arguments + ["--output", output])
    with open(output + ".json") as f:
        cell = json.load(f)["cells"][0]
    assert set(cell["ms"]) == set(qat_graph.VARIANTS) and all(value > 0 for value in cell["ms"].values())
    with open(output + ".md") as f:
        assert "| 0.5 | 1 |" in f.read()
