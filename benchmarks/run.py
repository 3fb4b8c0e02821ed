"""Benchmarks of keras_mobilevitv2 against the other MobileViTv2 implementations.

    python -m benchmarks.run [--output_dir benchmark_results] [--sections latency attention size training]
        [--widths 0.5 1.0] [--batch_sizes 1 16] [--image_size 256] [--repeats 20] [--warmup 3]
        [--threads N] [--tiny]

Sections:
  1. latency   - this package (Keras eager, graph mode, XLA, float and int8
                 TFLite) against timm (PyTorch), kimm, kecam and the
                 keras.applications MobileNets, with ratios; TFLite models of
                 one width and batch, and our graph mode with timm, timed in turn;
  2. attention - separable self-attention against multi-head attention as the
                 number of tokens grows: time, memory, growth exponent;
  3. size      - parameters, MACs, TFLite bytes and the share of the
                 machine's matmul peak reached, per width;
  4. training  - training throughput against timm, on a GPU only;
  5. converters - timm converted to TFLite by litert-torch and by
                 torch.onnx + onnx2tf (each in its own virtual environment,
                 created on first use), checked against timm's logits and
                 timed in turn with our TFLite models. Only when named in
                 --sections;
  6. v1_v2     - MobileViT (v1) against MobileViTv2 at matched accuracy
                 (the paper's pairs), float and int8 TFLite, batch 1, timed
                 in turn (`benchmarks.v1_v2`). Only when named in --sections.

Prints the markdown tables and writes them to OUTPUT_DIR/results.md, the raw
figures to OUTPUT_DIR/results.json and a summary plot to
OUTPUT_DIR/results.png. Every implementation gets random weights (nothing is
downloaded); one that cannot be imported, built or converted shows as
"n/a (reason)". `--tiny` runs every code path in about a minute on tiny
inputs: a smoke test, not a benchmark.
"""

import dataclasses
import json
import os
import platform
import sys
import time

from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.isolation import cpu_name
from benchmarks.settings import parse_settings

RESULT_NAME = "results"
OPT_IN_SECTIONS = ("converters", "v1_v2")  # rendered after report.markdown's sections


def environment():
    import tensorflow as tf

    from benchmarks.competitors import library_versions

    return {
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "versions": library_versions(),
        "load_average": {"start": os.getloadavg()[0]},
    }


def _rows(section):
    """The latency rows, or None when the section did not run or failed."""
    return section if isinstance(section, list) else None


def section_text(name, section, environment):
    # The opt-in sections render their own tables (report.py knows the others).
    from benchmarks import converter_peers
    from benchmarks import report
    from benchmarks import v1_v2

    if name == "converters":
        return converter_peers.section_text(section, environment)
    if name == "v1_v2":
        return v1_v2.section_text(section, environment)
    return report.section_text(name, section, environment)


def _run_sections(settings, results):
    from benchmarks import attention_scaling
    from benchmarks import converter_peers
    from benchmarks import latency
    from benchmarks import model_size
    from benchmarks import training_gpu
    from benchmarks import v1_v2

    plan = (
        ("latency", lambda: latency.run_section(settings)),
        ("attention", lambda: attention_scaling.run_section(settings)),
        ("size", lambda: model_size.run_section(settings, _rows(results.get("latency")))),
        ("training", lambda: training_gpu.run_section(settings)),
        ("converters", lambda: converter_peers.run_section(settings)),
        ("v1_v2", lambda: v1_v2.run_section(settings)),
    )
    for name, run in plan:
        if name not in settings.sections:
            continue
        log(f"section {name}")
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as error:  # a section's failure must not lose the others
            results[name] = {"error": short_reason(error)}
        results["seconds"][name] = time.perf_counter() - start
        print("\n" + section_text(name, results[name], results["environment"]), flush=True)


def write_results(results, output_dir):
    from benchmarks import report

    os.makedirs(output_dir, exist_ok=True)
    paths = {suffix: os.path.join(output_dir, f"{RESULT_NAME}.{suffix}") for suffix in ("md", "json", "png")}
    text = report.markdown(results)
    for name in OPT_IN_SECTIONS:
        if name in results:
            text += "\n\n" + section_text(name, results[name], results["environment"])
    with open(paths["md"], "w") as f:
        f.write(text + "\n")
    try:
        problem = report.plot(results, paths["png"])
    except Exception as error:  # the tables and figures are written anyway
        problem = f"no plot: {short_reason(error)}"
    if problem:
        results["plot"] = problem
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    return paths


def main(argv=None):
    settings, output_dir = parse_settings(argv, description=__doc__.split("\n")[0])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from benchmarks.runtimes import configure_tensorflow_threads

    configure_tensorflow_threads(settings.threads)  # before TensorFlow runs anything
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notices: every runner has its own tf.function
    from benchmarks import report

    results = {"settings": dataclasses.asdict(settings), "environment": environment(), "seconds": {}}
    print(report.header_text(results), flush=True)
    _run_sections(settings, results)
    results["environment"]["load_average"]["end"] = os.getloadavg()[0]
    paths = write_results(results, output_dir)
    log(f"wrote {', '.join(paths.values())}" + (f" ({results['plot']})" if "plot" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
