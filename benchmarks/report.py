"""Markdown tables and the summary plot of a benchmark run.

Works on the plain result dictionaries of the sections (what `results.json`
holds), so the report of a saved run can be rebuilt:

    python -m benchmarks.report benchmark_results/results.json
"""

import collections
import json
import sys

OURS = "keras_mobilevitv2"
REFERENCE = "timm"
RUNTIME_COLUMNS = (
    ("eager", "Keras eager"),
    ("graph", "graph (tf.function)"),
    ("xla", "XLA (jit_compile)"),
    ("torch", "PyTorch eager"),
    ("tflite_float", "TFLite float"),
    ("tflite_int8", "TFLite int8"),
    ("tflite_int8_qat", "TFLite int8 (QAT)"),
    ("graph_in_turn", "graph, timed in turn"),
    ("torch_in_turn", "PyTorch, timed in turn"),
)
RUNTIME_NAMES = dict(RUNTIME_COLUMNS)
CELL_REASON = 70
UNSTABLE_SPREAD = 0.25  # interquartile range / median above which a cell is flagged
MIB = 2**20


def print_and_write(result, text, output):
    """Prints a benchmark's markdown `text`; with `output`, writes
    `<output>.json` (the result) and `<output>.md` (the text)."""
    print(text)
    if output:
        with open(output + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(output + ".md", "w") as f:
            f.write(text)


def table(header, rows, align=None):
    """A markdown table; `align` is a string of "l"/"r", one per column (left by default)."""
    rules = ["---:" if side == "r" else "---" for side in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(value):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(numerator, denominator):
    if not numerator or not denominator:
        return "-"
    value = numerator / denominator
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def _cut(text, limit=CELL_REASON):
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def median_ms(row):
    """A result row's median latency in ms; None for a missing row or one that did not run."""
    return row["timing"]["median_ms"] if row and row.get("status") == "ok" and row.get("timing") else None


def _width_text(width):
    return "-" if width is None else f"{width:g}"


def busy_load(environment):
    """Load average above which other processes competed for the CPUs: the
    benchmark alone keeps it at or below the CPU count (PyTorch's OpenMP
    threads already slow down several-fold when one other process runs).
    Infinite for a result that did not record its CPU count: the machine
    that renders it is not the one that ran it, so nothing is flagged."""
    cpus = environment.get("cpus")
    return float("inf") if cpus is None else cpus + 0.5


def cpus_text(environment):
    """ "N CPUs", as recorded by the run."""
    cpus = environment.get("cpus")
    return "an unrecorded number of CPUs" if cpus is None else f"{cpus} CPUs"


def timing_text(timing, busy):
    """`median [p25-p75]`, marked † when measured on a busy machine and ‡
    when the runs spread widely (the median is then not a stable figure)."""
    text = f"{ms(timing['median_ms'])} [{ms(timing['p25_ms'])}-{ms(timing['p75_ms'])}]"
    load = timing.get("load_average")
    if load is not None and load > busy:
        text += "†"
    if timing["p75_ms"] - timing["p25_ms"] > UNSTABLE_SPREAD * timing["median_ms"]:
        text += "‡"
    return text


def machine_text(result):
    """ ", <processor>" for a result that names the machine it ran on (older
    committed results do not)."""
    return f", {result['machine']}" if result.get("machine") else ""


def busy_note(environment):
    busy = (
        "† not judged: this run did not record its CPU count."
        if environment.get("cpus") is None
        else f"† measured while the 1-minute load average exceeded {busy_load(environment):g} (other processes "
        "competed for the CPUs): that figure is inflated."
    )
    return (
        f"{busy} ‡ the interquartile range exceeds {UNSTABLE_SPREAD:.0%} of the median (e.g. timings switching "
        "between two levels): re-measure before drawing conclusions from that cell."
    )


# ---------------------------------------------------------------- header


def environment_text(environment, settings):
    versions = ", ".join(f"{name} {version}" for name, version in environment["versions"].items() if version)
    load = environment.get("load_average")
    lines = [
        f"Machine: {environment['machine']}, {environment['cpus']} CPUs, GPUs: {environment['gpus']}",
        f"Threads: {settings['threads']} for every framework (TensorFlow intra-op {settings['threads']} and "
        f"inter-op 1, torch.set_num_threads({settings['threads']}), TFLite num_threads={settings['threads']})",
        f"Libraries: {versions}",
        f"Timing: median of up to {settings['repeats']} runs after {settings['warmup']} warm-up call(s), "
        f"at most about {settings['max_seconds']:g} s of timed runs per cell; random weights",
    ]
    if load:
        lines.append(
            f"Load average (1 min) at start {load['start']:.2f}, at end {load.get('end', float('nan')):.2f}: "
            f"above {busy_load(environment):g}, other processes shared the CPUs and figures are inflated "
            "(PyTorch's OpenMP threads most of all)"
        )
    if settings.get("tiny"):
        lines.append("**--tiny configuration: a smoke run, not a benchmark.**")
    return "\n".join(f"- {line}" for line in lines)


# ---------------------------------------------------------------- latency


def _cell(row, reasons_in_row, busy):
    if row is None:
        return "-"
    if row["status"] == "ok":
        return timing_text(row["timing"], busy)
    if row["status"] == "skipped":
        return "skipped"
    if row["reason"] in reasons_in_row:
        return "n/a (as left)"
    reasons_in_row.add(row["reason"])
    return f"n/a ({_cut(row['reason'])})"


def _grouped(rows):
    """{(implementation, label, width, batch, image_size): {runtime: row}}, in row order."""
    groups = collections.OrderedDict()
    for row in rows:
        key = (row["implementation"], row["label"], row["width"], row["batch"], row["image_size"])
        groups.setdefault(key, {})[row["runtime"]] = row
    return groups


def _failed_everywhere(rows):
    """{implementation: reason} for those whose every row failed for one reason."""
    outcomes = collections.defaultdict(set)
    for row in rows:
        outcomes[row["implementation"]].add(row["reason"] if row["status"] == "n/a" else None)
    return {key: next(iter(reasons)) for key, reasons in outcomes.items() if len(reasons) == 1 and None not in reasons}


def latency_table(rows, busy):
    columns = [(runtime, name) for runtime, name in RUNTIME_COLUMNS if any(r["runtime"] == runtime for r in rows)]
    failed = _failed_everywhere(rows)
    body, collapsed = [], set()
    for (implementation, label, width, batch, size), cells in _grouped(rows).items():
        if implementation in failed:  # one row instead of one per width and batch
            if implementation not in collapsed:
                collapsed.add(implementation)
                note = f"n/a ({_cut(failed[implementation], 200)})"
                body.append([label, "all", "all", size, note] + [""] * (len(columns) - 1))
            continue
        seen = set()
        body.append(
            [label, _width_text(width), batch, size] + [_cell(cells.get(runtime), seen, busy) for runtime, _ in columns]
        )
    header = ["implementation", "width", "batch", "image"] + [name for _, name in columns]
    return table(header, body)


def find_row(rows, **key):
    """The first result row whose fields equal `key`'s (None if there is none)."""
    return next((row for row in rows if all(row.get(name) == value for name, value in key.items())), None)


def _find(rows, implementation, width, batch, runtime):
    return find_row(rows, implementation=implementation, width=width, batch=batch, runtime=runtime)


def reference_ratio_table(rows):
    """This package / timm, per width and batch (below 1: this package is faster)."""
    keys = [(r["width"], r["batch"]) for r in rows if r["implementation"] == OURS and r["runtime"] == "graph"]
    body = []
    for width, batch in keys:
        timm = median_ms(_find(rows, REFERENCE, width, batch, "torch"))
        cells = [
            ratio(median_ms(_find(rows, OURS, width, batch, runtime)), timm)
            for runtime in ("eager", "graph", "xla", "tflite_float", "tflite_int8")
        ]
        in_turn = [
            median_ms(_find(rows, implementation, width, batch, runtime))
            for implementation, runtime in ((OURS, "graph_in_turn"), (REFERENCE, "torch_in_turn"))
        ]
        cells.append(f"{ms(in_turn[0])} / {ms(in_turn[1])} = {ratio(*in_turn)}" if all(in_turn) else "-")
        body.append([_width_text(width), batch, ms(timm)] + cells)
    header = [
        "width",
        "batch",
        "timm ms",
        "eager / timm",
        "graph / timm",
        "XLA / timm",
        "TFLite float / timm",
        "TFLite int8 / timm",
        "graph / timm, timed in turn (ms)",
    ]
    return table(header, body)


def other_keras_table(rows):
    """This package against the fastest other Keras MobileViTv2, per runtime."""
    others = {r["implementation"] for r in rows if r["implementation"].startswith(("kimm", "kecam"))}
    body = []
    for row in rows:
        if row["implementation"] != OURS or row["runtime"] == "tflite_int8_qat":
            continue
        candidates = [
            (median_ms(_find(rows, other, row["width"], row["batch"], row["runtime"])), other)
            for other in sorted(others)
        ]
        candidates = [(value, other) for value, other in candidates if value]
        if not candidates or not median_ms(row):
            continue
        best, name = min(candidates)
        body.append(
            [
                _width_text(row["width"]),
                row["batch"],
                RUNTIME_NAMES[row["runtime"]],
                ms(median_ms(row)),
                f"{name} {ms(best)}",
                ratio(median_ms(row), best),
            ]
        )
    header = ["width", "batch", "runtime", "this package ms", "fastest other Keras ms", "ours / fastest"]
    return table(header, body)


def int8_table(rows):
    """int8 against float TFLite per implementation, with what is inside the int8 model."""
    body = []
    failed = _failed_everywhere(rows)  # already a single row of the main table
    for (implementation, label, width, batch, _size), cells in _grouped(rows).items():
        if implementation in failed:
            continue
        float_row = cells.get("tflite_float")
        for runtime in ("tflite_int8", "tflite_int8_qat"):
            int8_row = cells.get(runtime)
            if int8_row is None or int8_row["status"] == "skipped":
                continue
            info = int8_row.get("tflite") or {}
            float_info = (float_row or {}).get("tflite") or {}
            status = "" if int8_row["status"] == "ok" else f"n/a ({_cut(int8_row['reason'])})"
            body.append(
                [
                    label + (" QAT" if runtime == "tflite_int8_qat" else ""),
                    _width_text(width),
                    batch,
                    ms(median_ms(float_row)),
                    ms(median_ms(int8_row)) if not status else status,
                    ratio(median_ms(int8_row), median_ms(float_row)),
                    f"{float_info['bytes'] / 1e6:.2f}" if float_info else "-",
                    f"{info['bytes'] / 1e6:.2f}" if info else "-",
                    info.get("route", "-"),
                    info.get("float_tensors_inside", "-"),
                ]
            )
    header = [
        "implementation",
        "width",
        "batch",
        "float ms",
        "int8 ms",
        "int8 / float",
        "float MB",
        "int8 MB",
        "int8 route",
        "float tensors inside int8",
    ]
    return table(header, body)


def latency_text(rows, environment):
    return "\n\n".join(
        [
            "## 1. Inference latency (ms per batch)",
            "Median [25th-75th percentile] in milliseconds per batch. Graph mode is `tf.function` with a fixed "
            "input signature (the compiled path `predict_on_batch` takes); XLA is `tf.function(jit_compile=True)`; "
            "TFLite is the default CPU runtime (LiteRT interpreter, XNNPACK delegate) with the model exported "
            "at that batch size; the int8 models are post-training quantized with the same converter settings "
            "for every implementation (this package's through its own `quantization.export.convert`). "
            "All TFLite models of one width and batch size are timed in turn, one turn each per round (calls "
            "repeated for 50 ms, their median one sample) in a rotating order, so the machine's drift during "
            "the run falls on all of them alike.",
            latency_table(rows, busy_load(environment)),
            busy_note(environment),
            "### This package / timm (PyTorch)",
            "Time of this package on each runtime divided by timm's PyTorch eager time; below 1.00x this package "
            "is faster. The columns before the last divide figures taken in different phases of the run; the "
            "last one times this package's graph mode and timm in turn, each in its own process (rotating "
            "order; each turn one untimed call, then calls for 50 ms, their median one sample; a call is a "
            "round trip through a pipe, about 0.1 ms added to both), so the machine's drift falls on both alike.",
            reference_ratio_table(rows),
            "### This package / the fastest other Keras MobileViTv2 (kimm, kecam)",
            'Per runtime, the figures of the phases above; the rows "graph, timed in turn" time the graph '
            "modes of this package, kimm and kecam (and timm) in turn, each in its own process, as in the last "
            "column of the table above.",
            other_keras_table(rows),
            "### int8 / float TFLite",
            int8_table(rows),
        ]
    )


# ---------------------------------------------------------------- attention


def _mib(row):
    if row is None or row.get("peak_bytes") is None:
        return "-"
    if row["peak_bytes"] == 0:
        return "< 0.25 (uncounted)"
    return f"{row['peak_bytes'] / MIB:.2f}"


def attention_text(section, environment):
    rows = section["rows"]
    by_point = {(r["kind"], r["tokens"]): r for r in rows}
    body = []
    for tokens in sorted({r["tokens"] for r in rows}):
        separable, multi_head = by_point.get(("separable", tokens)), by_point.get(("multi_head", tokens))

        def memory(row):
            # 0: every tensor was under the allocator's 256 KiB statistics threshold.
            return row["peak_bytes"] / MIB if row and row.get("peak_bytes") else None

        def time_cell(row):
            if row is None or row["status"] != "ok":
                return f"n/a ({_cut(row['reason'])})" if row else "-"
            return timing_text(row["timing"], busy_load(environment))

        sep_memory, mha_memory = memory(separable), memory(multi_head)
        body.append(
            [
                tokens,
                time_cell(separable),
                time_cell(multi_head),
                ratio(median_ms(separable), median_ms(multi_head)),
                _mib(separable),
                _mib(multi_head),
                ratio(sep_memory, mha_memory),
            ]
        )
    channels = rows[0]["channels"] if rows else "?"
    header = [
        "tokens N",
        "separable ms",
        "multi-head ms",
        "separable / multi-head time",
        "separable MiB",
        "multi-head MiB",
        "separable / multi-head memory",
    ]
    growth_lines = []
    for kind, name in (("separable", "separable"), ("multi_head", "multi-head")):
        fit = section["growth"].get(kind, {})
        slope = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
        growth_lines.append(
            f"- {name}: time grows as N^{slope(fit.get('time_slope'))}, memory as "
            f"N^{slope(fit.get('memory_slope'))} (log-log fit over N = {fit.get('fitted_tokens')})"
        )
    return "\n\n".join(
        [
            "## 2. Separable self-attention vs multi-head attention",
            f"C = {channels} channels, batch 1, graph mode. `SeparableSelfAttention` on [1, N, 1, C] (N patches "
            f"of one pixel: the softmax spans all N tokens); `MultiHeadAttention(num_heads=1, key_dim={channels})` "
            "self-attention on [1, N, C]. Memory: peak bytes held by TensorFlow's CPU allocator during one call, "
            "above what was held before it; the allocator keeps no statistics for allocations under 256 KiB "
            "(its small-size pool), so figures for small N are lower bounds.",
            table(header, body),
            busy_note(environment),
            "Growth (slope 1: linear, 2: quadratic):\n" + "\n".join(growth_lines),
        ]
    )


# ---------------------------------------------------------------- size


def size_text(section, environment):
    peak = section["peak"]
    peak_rate = peak["gmacs_per_s"]
    body = []
    for row in section["rows"]:

        def share(key, row=row):
            value = row.get(key)
            return "-" if value is None else f"{value:.1f} ({100 * value / peak_rate:.0f}%)"

        def latency(key, row=row):
            return timing_text(row[key], busy_load(environment)) if row.get(key) else "-"

        def megabytes(key, row=row):
            return "-" if row.get(key) is None else f"{row[key] / 1e6:.2f}"

        body.append(
            [
                _width_text(row["width"]),
                "-" if "params" not in row else f"{row['params'] / 1e6:.3f}",
                "-" if "macs" not in row else f"{row['macs'] / 1e9:.3f}",
                "-" if row.get("timm_macs") is None else f"{row['timm_macs'] / 1e9:.3f}",
                "-" if "elementwise_multiplies" not in row else f"{row['elementwise_multiplies'] / 1e6:.1f}",
                megabytes("tflite_float_bytes"),
                megabytes("tflite_int8_bytes"),
                row.get("int8_float_tensors_inside", "-"),
                latency("graph_timing"),
                share("graph_gmacs_per_s"),
                latency("tflite_float_timing"),
                share("tflite_float_gmacs_per_s"),
                _cut("; ".join(row.get("notes", [])), 120),
            ]
        )
    header = [
        "width",
        "params (M)",
        "GMACs (graph)",
        "timm GMACs (torch counter)",
        "elementwise mul (M)",
        "TFLite float MB",
        "TFLite int8 MB",
        "float tensors in int8",
        "graph ms (b1)",
        "graph GMAC/s (% peak)",
        "TFLite float ms (b1)",
        "TFLite GMAC/s (% peak)",
        "notes",
    ]
    size = section["rows"][0]["image_size"] if section["rows"] else "?"
    return "\n\n".join(
        [
            "## 3. Model size per width",
            f"This package's MobileViTv2 at {size}x{size}, batch 1. GMACs are counted from the TensorFlow graph: "
            "Conv2D, DepthwiseConv2dNative, MatMul/BatchMatMul and Einsum (output elements x contracted size); "
            "elementwise multiplies are listed apart and not included. timm's figure comes from PyTorch's "
            "FlopCounterMode (FLOPs / 2) on timm's model at the same size. GMAC/s divide these counted MACs by "
            "the time. The float TFLite model runs fewer: its exporter merges three pairs of 1x1 convolutions "
            "(`quantization/merge_pointwise.py`; 12% of the MACs at width 1.0). XNNPACK's kernels can also beat "
            "TensorFlow's matmul, so the TFLite share of the peak can pass 100%.",
            f"Machine peak: {peak['size']}x{peak['size']} float32 matmul in TensorFlow graph mode, "
            f"{timing_text(peak['timing'], busy_load(environment))} ms = **{peak_rate:.1f} GMAC/s**.",
            table(header, body),
            busy_note(environment),
        ]
    )


# ---------------------------------------------------------------- training


def training_text(section, environment=None):
    if section["status"] != "ok":
        return f"## 4. Training throughput\n\n{section['reason']}"
    body = [[_width_text(r["width"]), r["impl"], r["device"], f"{r['rate']:.1f}"] for r in section["rows"]]
    return "## 4. Training throughput\n\n" + table(["width", "implementation", "device", "images/s"], body)


# ---------------------------------------------------------------- plot


def plot(results, path):
    """Writes the summary PNG; returns None, or the reason no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no plot: {error}"

    figure, axes = plt.subplots(2, 2, figsize=(15, 11))
    latency = results.get("latency")
    _plot_latency(axes[0][0], latency if isinstance(latency, list) else [])  # a failed section is a dict
    attention = (results.get("attention") or {}).get("rows", [])
    _plot_attention(
        axes[0][1], attention, lambda r: r["timing"]["median_ms"] if r["timing"] else None, "time per call (ms)"
    )
    _plot_attention(
        axes[1][0],
        attention,
        lambda r: r["peak_bytes"] / MIB if r["peak_bytes"] else None,
        "peak allocator memory (MiB)",
    )
    _plot_size(axes[1][1], results.get("size"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _plot_latency(axis, rows):
    # The smallest batch and width, and the MobileNets: one bar per runtime.
    batch = min((r["batch"] for r in rows), default=None)
    width = min((r["width"] for r in rows if r["implementation"] == OURS), default=None)
    chosen = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["batch"] == batch
        and (r["width"] == width or r["implementation"].startswith("mobilenet"))
    ]
    labels = [f"{r['label']} {_width_text(r['width'])} / {RUNTIME_NAMES[r['runtime']]}" for r in chosen]
    values = [r["timing"]["median_ms"] for r in chosen]
    colors = ["tab:blue" if r["implementation"] == OURS else "tab:gray" for r in chosen]
    axis.barh(range(len(values)), values, color=colors)
    axis.set_yticks(range(len(values)))
    axis.set_yticklabels(labels, fontsize=6)
    axis.invert_yaxis()
    if values:
        axis.set_xscale("log")
    axis.set_xlabel("median latency (ms), log scale")
    axis.set_title(f"1. Latency at batch {batch}, width {_width_text(width)} (this package in blue)")


def _plot_attention(axis, rows, value, label):
    for kind, name in (("separable", "separable self-attention"), ("multi_head", "multi-head attention")):
        points = [(r["tokens"], value(r)) for r in rows if r["kind"] == kind and r["status"] == "ok"]
        points = [(n, v) for n, v in points if v]
        if points:
            axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("tokens N")
    axis.set_ylabel(label)
    axis.set_title(f"2. Attention: {label} vs tokens")
    if axis.get_lines():
        axis.legend()


def _plot_size(axis, section):
    rows = (section or {}).get("rows", [])
    for key, name in (("graph_timing", "graph mode"), ("tflite_float_timing", "TFLite float")):
        points = [(r["macs"] / 1e9, r[key]["median_ms"]) for r in rows if r.get(key) and r.get("macs")]
        if points:
            axis.plot(*zip(*points), marker="o", label=name)
            for (x, y), row in zip(points, [r for r in rows if r.get(key) and r.get("macs")]):
                axis.annotate(_width_text(row["width"]), (x, y), fontsize=7)
    axis.set_xlabel("GMACs per image")
    axis.set_ylabel("batch-1 latency (ms)")
    axis.set_title("3. Latency vs MACs per width (this package)")
    if axis.get_lines():
        axis.legend()


# ---------------------------------------------------------------- whole report

SECTION_TEXTS = {
    "latency": ("1. Inference latency", latency_text),
    "attention": ("2. Separable self-attention vs multi-head attention", attention_text),
    "size": ("3. Model size per width", size_text),
    "training": ("4. Training throughput", training_text),
}


def section_text(name, section, environment):
    title, render = SECTION_TEXTS[name]
    if isinstance(section, dict) and "error" in section:
        return f"## {title}\n\nn/a ({section['error']})"
    return render(section, environment)


def header_text(results):
    return "# keras_mobilevitv2 benchmarks\n\n" + environment_text(results["environment"], results["settings"])


def markdown(results):
    parts = [header_text(results)]
    parts += [section_text(name, results[name], results["environment"]) for name in SECTION_TEXTS if name in results]
    return "\n\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS_JSON", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(markdown(json.load(f)))
    return 0


def target_report(name, model, output_dir, label, **options):
    """`quantization.targets.export`'s report; a refusal is a result of a
    benchmark (its report says why), not a failure."""
    from quantization import targets

    try:
        return targets.export(name, model, output_dir, name=label, **options)
    except targets.TargetError as error:
        return dict(error.report, refused=str(error))


if __name__ == "__main__":
    sys.exit(main())
