"""Section 2: separable self-attention against multi-head attention, by token count.

Both layers have C channels (C=128 by default) and one batch:

* `SeparableSelfAttention(C)` on a patch tensor [1, N, 1, C]: N patches of
  one pixel each, so its softmax spans all N tokens, as attention does;
* `keras.layers.MultiHeadAttention(num_heads=1, key_dim=C)` on [1, N, C]
  (self-attention: query = value = x).

Time: graph mode (`tf.function` with a fixed input signature), median.
Memory: the peak bytes TensorFlow's CPU allocator holds during one call,
minus the bytes held before it (the input and weights), read with
`tf.config.experimental.get_memory_info("CPU:0")` after
`reset_memory_stats`. This counts every tensor the call allocates (the N x N
attention matrix of multi-head attention included), not the interpreter or
library memory that an RSS reading would mix in, so it can be measured
in-process, point after point. Caveat: TensorFlow's oneDNN CPU allocator
serves allocations under 256 KiB from a small-size pool that keeps no
statistics, so they are not counted: at C=128 a [N, C] float tensor reaches
256 KiB at N=512, and figures for smaller N are lower bounds (often 0).

Growth: the slope of log(time) and log(memory) against log(N), fitted on the
points with N >= 1024 (smaller ones are dominated by fixed per-call costs):
about 1 for linear, about 2 for quadratic growth.
"""

import gc

import numpy as np

from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.timing import time_callable

KINDS = ("separable", "multi_head")
FIT_FROM_TOKENS = 1024


def _layer_and_input(kind, tokens, channels):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(tokens)
    if kind == "separable":
        from keras_mobilevitv2.layers import SeparableSelfAttention

        layer = SeparableSelfAttention(channels)
        inputs = tf.constant(rng.standard_normal((1, tokens, 1, channels), np.float32))
        call = lambda x: layer(x)  # noqa: E731
    else:
        layer = keras.layers.MultiHeadAttention(num_heads=1, key_dim=channels)
        inputs = tf.constant(rng.standard_normal((1, tokens, channels), np.float32))
        call = lambda x: layer(x, x)  # noqa: E731
    call(inputs[:, :2])  # builds the weights
    compiled = tf.function(call, input_signature=[tf.TensorSpec(inputs.shape, inputs.dtype)])
    compiled.get_concrete_function()  # traced now: tracing allocates nothing measured below
    return compiled, inputs


def peak_call_bytes(compiled, inputs):
    """Peak allocator bytes of one call above what was held before it."""
    import tensorflow as tf

    held = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    np.asarray(compiled(inputs))
    return int(tf.config.experimental.get_memory_info("CPU:0")["peak"] - held)


def _measure_point(kind, tokens, settings):
    compiled, inputs = _layer_and_input(kind, tokens, settings.attention_channels)
    try:
        memory = peak_call_bytes(compiled, inputs)
    except (ValueError, RuntimeError, AttributeError) as error:  # allocator statistics unavailable
        memory, memory_reason = None, short_reason(error)
    else:
        memory_reason = ""
    run = lambda: np.asarray(compiled(inputs))  # noqa: E731
    timing = time_callable(run, settings.warmup, settings.repeats, settings.max_seconds)
    return {
        "kind": kind,
        "tokens": tokens,
        "channels": settings.attention_channels,
        "status": "ok",
        "reason": memory_reason,
        "timing": timing.to_dict(),
        "peak_bytes": memory,
    }


def log_log_slope(xs, ys):
    """Least-squares slope of log(y) on log(x); None with fewer than 2 points."""
    points = [(x, y) for x, y in zip(xs, ys) if x and y and y > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def growth(rows):
    """{kind: {"time_slope", "memory_slope", "fitted_tokens"}} over the large-N points."""
    result = {}
    for kind in KINDS:
        points = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
        large = [r for r in points if r["tokens"] >= FIT_FROM_TOKENS]
        fitted = large if len(large) >= 2 else points
        result[kind] = {
            "time_slope": log_log_slope([r["tokens"] for r in fitted], [r["timing"]["median_ms"] for r in fitted]),
            "memory_slope": log_log_slope([r["tokens"] for r in fitted], [r["peak_bytes"] for r in fitted]),
            "fitted_tokens": [r["tokens"] for r in fitted],
        }
    return result


def run_section(settings):
    rows = []
    for tokens in settings.tokens:
        for kind in KINDS:
            log(f"attention {kind} with {tokens} tokens")
            try:
                rows.append(_measure_point(kind, tokens, settings))
                log(f"  median {rows[-1]['timing']['median_ms']:.3f} ms")
            except Exception as error:  # e.g. out of memory at large N
                log(f"  n/a: {short_reason(error)}")
                rows.append(
                    {
                        "kind": kind,
                        "tokens": tokens,
                        "channels": settings.attention_channels,
                        "status": "n/a",
                        "reason": short_reason(error),
                        "timing": None,
                        "peak_bytes": None,
                    }
                )
            gc.collect()
    return {"rows": rows, "growth": growth(rows)}
