"""Section 4: training throughput, on a GPU only.

Runs `benchmarks/training_throughput.py` (this package's trainer against
timm's training step) in its own process when TensorFlow sees a GPU; on a
CPU-only machine the section is skipped (a CPU training figure would only
repeat the latency section, far more slowly).
"""

from benchmarks.console import log
from benchmarks.console import short_reason

TIMEOUT_S = 3600


def run_section(settings):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"status": "skipped", "reason": "skipped: no GPU", "rows": []}
    from benchmarks.isolation import run_module

    log(f"training throughput on {len(gpus)} GPU(s)")
    widths = [str(width) for width in settings.widths]
    try:
        rows = run_module(
            "benchmarks.training_throughput",
            [
                "--widths",
                *widths,
                "--batch_size",
                str(max(settings.batch_sizes)),
                "--image_size",
                str(settings.image_size),
            ],
            timeout_s=TIMEOUT_S,
            output_flag="--json",
        )
    except Exception as error:
        return {"status": "n/a", "reason": short_reason(error), "rows": []}
    return {"status": "ok", "reason": "", "rows": rows, "gpus": len(gpus)}
