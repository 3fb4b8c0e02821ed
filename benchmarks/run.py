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
  4. training  - training throughput against timm, on a GPU only.

Prints the markdown tables and writes them to OUTPUT_DIR/results.md, the raw
figures to OUTPUT_DIR/results.json and a summary plot to
OUTPUT_DIR/results.png. Every implementation gets random weights (nothing is
downloaded); one that cannot be imported, built or converted shows as
"n/a (reason)". `--tiny` runs every code path in about a minute on tiny
inputs: a smoke test, not a benchmark.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.settings import SECTIONS
from benchmarks.settings import TINY
from benchmarks.settings import Settings

RESULT_NAME = "results"


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="Default: all.")
    parser.add_argument("--widths", type=float, nargs="+", help="Latency section widths (default 0.5 1.0).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", help="Default: 1 16.")
    parser.add_argument("--image_size", type=int, help="MobileViTv2 input size (default 256).")
    parser.add_argument("--repeats", type=int, help="Timed runs per measurement, at most (default 20).")
    parser.add_argument("--warmup", type=int, help="Untimed calls, the first included (default 3).")
    parser.add_argument("--threads", type=int, help="Threads for every framework (default: all CPUs).")
    parser.add_argument("--implementations", nargs="+", help="Subset of the latency section's implementations.")
    parser.add_argument("--tokens", type=int, nargs="+", help="Attention section token counts.")
    parser.add_argument("--size_widths", type=float, nargs="+", help="Size section widths (default: all 7).")
    parser.add_argument("--tiny", action="store_true", help="Tiny smoke configuration (not a benchmark).")
    args = parser.parse_args(argv)

    values = dict(TINY) if args.tiny else {}
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name, None)
        if given is not None and field.name != "tiny":
            values[field.name] = tuple(given) if isinstance(given, list) else given
    settings = Settings(**values)
    if settings.threads < 1 or settings.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    return settings, args.output_dir


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    import tensorflow as tf

    from benchmarks.competitors import library_versions

    return {
        "machine": _cpu_name(),
        "cpus": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "versions": library_versions(),
        "load_average": {"start": os.getloadavg()[0]},
    }


def _rows(section):
    """The latency rows, or None when the section did not run or failed."""
    return section if isinstance(section, list) else None


def _run_sections(settings, results):
    from benchmarks import attention_scaling
    from benchmarks import latency
    from benchmarks import model_size
    from benchmarks import report
    from benchmarks import training_gpu

    plan = (
        ("latency", lambda: latency.run_section(settings)),
        ("attention", lambda: attention_scaling.run_section(settings)),
        ("size", lambda: model_size.run_section(settings, _rows(results.get("latency")))),
        ("training", lambda: training_gpu.run_section(settings)),
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
        print("\n" + report.section_text(name, results[name], results["environment"]), flush=True)


def write_results(results, output_dir):
    from benchmarks import report

    os.makedirs(output_dir, exist_ok=True)
    paths = {suffix: os.path.join(output_dir, f"{RESULT_NAME}.{suffix}") for suffix in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(report.markdown(results) + "\n")
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
    settings, output_dir = parse_settings(argv)
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
