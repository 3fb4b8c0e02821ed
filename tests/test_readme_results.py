"""The README's `make demo` figures are the committed report's, as the
pipeline itself formats them: a README that drifts from results/ fails."""

import json
import os
import re

import pytest

from quantization.pipeline_report import int8_verdict
from quantization.pipeline_report import summary_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results", "demo")
BLOCK = re.compile(r"<!-- demo-results:start -->\n(.*?)\n<!-- demo-results:end -->", re.S)


def _committed():
    path = os.path.join(RESULTS, "pipeline_report.json")
    if not os.path.exists(path):
        pytest.skip("results/demo is not in this checkout")
    with open(path) as f:
        return json.load(f)


def test_readme_demo_table_is_the_committed_report():
    report = _committed()
    verdict = int8_verdict(report["rows"], report["evaluation_images"])
    expected = summary_text(report["rows"], report["targets"], verdict)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = BLOCK.findall(f.read())
    assert len(blocks) == 1, "README.md needs one <!-- demo-results:start/end --> block"
    assert blocks[0].strip() == expected.strip()
    with open(os.path.join(RESULTS, "summary.md"), encoding="utf-8") as f:
        assert f.read().strip() == expected.strip()


def test_committed_demo_ran_the_pipeline_defaults():
    """`make demo` runs the pipeline with its defaults: a changed default
    needs a new run before the README's figures can stand for `make demo`."""
    import dataclasses

    from quantization.pipeline_stages import PipelineConfig

    config = _committed()["config"]
    default = {key: list(value) if isinstance(value, tuple) else value
               for key, value in dataclasses.asdict(PipelineConfig()).items()}  # fmt: skip
    assert config == default


def test_committed_demo_meets_its_promise():
    """What `make demo` promises a user, on the committed run."""
    rows = _committed()["rows"]
    assert rows["float_keras"]["top1"] >= 0.90
    assert rows["qat_int8_tflite"]["top1"] >= rows["float_keras"]["top1"] - 0.01
    assert os.path.getsize(os.path.join(RESULTS, "report.png")) > 10_000


def test_readme_segmentation_parity_table_is_the_committed_one():
    path = os.path.join(ROOT, "benchmarks", "results", "segmentation_parity.md")
    if not os.path.exists(path):
        pytest.skip("benchmarks/results is not in this checkout")
    with open(path, encoding="utf-8") as f:
        table = f.read().strip()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert table in f.read()
    differences = [float(line.split("|")[5]) for line in table.splitlines()[2:]]
    assert len(differences) >= 6 and max(differences) <= 1e-4


@pytest.mark.parametrize("name", ["segmentation_int8", "segmentation_latency", "detection_int8", "detection_latency"])
def test_readme_benchmark_table_is_the_committed_one(name):
    path = os.path.join(ROOT, "benchmarks", "results", f"{name}.md")
    if not os.path.exists(path):
        pytest.skip("benchmarks/results is not in this checkout")
    with open(path, encoding="utf-8") as f:
        table = "\n".join(line for line in f.read().splitlines() if line.startswith("|"))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert table in f.read()


def test_readme_benchmark_blocks_are_rendered_from_the_committed_results():
    # `python -m benchmarks.readme` writes these blocks with each benchmark's
    # own report code; a README edited by hand, or results committed without
    # re-rendering, fails here.
    from benchmarks import readme

    results = os.path.join(ROOT, "benchmarks", "results")
    if not os.path.exists(os.path.join(results, "results.json")):
        pytest.skip("benchmarks/results is not in this checkout")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    names = [match.group(2) for match in readme.BLOCK.finditer(text)]
    assert sorted(names) == sorted(readme.RENDERERS), names
    assert readme.update(text, results)[1] == []
