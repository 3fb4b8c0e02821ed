"""TensorFlow Lite Micro memory of int8 MobileViTv2: measured arena and flash.

    python -m benchmarks.micro_memory [--widths 0.5 1.0] [--sizes 64 128] [--output micro_memory.md]

For every width multiplier and input size, builds MobileViTv2 (1000 classes),
exports it as the int8 micro target is exported (`quantize_model` +
`calibrate` + `convert(..., "qat_int8", io_type="int8")`) and measures, with
the real TFLite Micro interpreter (`quantization.targets.micro_runtime.measure_arena`, not an
estimate):

* arena: the tensor arena TFLM allocates (head + tail, `print_allocations()`);
* flash: the flatbuffer size (the model only; the TFLM runtime adds its code).

The weights are random but non-degenerate: neither figure depends on weight
values (the memory plan depends on shapes and the op graph, the flatbuffer on
tensor sizes), but degenerate activation ranges would make TFLM's int8
softmax abort. Sizes grow per width until the arena exceeds --stop_above_bytes
(2 MiB): a larger input can only need more. Budgets are 1024-based (KiB, MiB).

Prints markdown: the measurements, the arena per (width, size), and per RAM
budget the largest input size whose arena fits.
"""

import argparse
import os
import sys
import time

WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
SIZES = (32, 64, 96, 128, 160, 192, 224, 256)
KIB, MIB = 1024, 1024 * 1024
BUDGETS = (("256 KiB", 256 * KIB), ("512 KiB", 512 * KIB), ("1 MiB", MIB), ("2 MiB", 2 * MIB))


def int8_flatbuffer(width, size, classes, seed=0, attention_norm=None):
    """The int8 (int8 I/O) micro-target flatbuffer of MobileViTv2 `width` at `size`."""
    import keras
    import numpy as np

    from benchmarks.random_weights import randomize_keras_weights
    from keras_mobilevitv2 import MobileViTv2
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.export import convert

    keras.backend.clear_session()  # one model per call: keep memory flat over a long run
    options = {} if attention_norm is None else {"attention_norm": attention_norm}
    model = MobileViTv2(width, weights=None, input_shape=(size, size, 3), classes=classes, **options)
    randomize_keras_weights(model, seed)  # O(1) activations: sane int8 ranges
    images = np.random.default_rng(seed).uniform(0, 255, (8, size, size, 3)).astype("float32")
    qat = calibrate(quantize_model(model), images)
    return convert(qat, "qat_int8", io_type="int8", representative_images=images[:2])


def measure(width, size, classes, attention_norm=None):
    """{width, size, arena_bytes, flash_bytes, operators, seconds, error}."""
    from quantization.targets.micro_checks import check_micro_compatibility
    from quantization.targets.micro_runtime import MicroRuntimeError
    from quantization.targets.micro_runtime import measure_arena

    start = time.perf_counter()
    row = {"width": width, "size": size, "arena_bytes": None, "flash_bytes": None, "operators": None, "error": None}
    try:
        flatbuffer = int8_flatbuffer(width, size, classes, attention_norm=attention_norm)
        row["flash_bytes"] = len(flatbuffer)
        check = check_micro_compatibility(flatbuffer)
        row["operators"] = check["operator_count"]
        if check["problems"]:
            row["error"] = "; ".join(check["problems"])
        else:
            row["arena_bytes"] = measure_arena(flatbuffer)
    except MicroRuntimeError as error:
        row["error"] = str(error).splitlines()[0]
    except Exception as error:  # one failing configuration must not lose an hour of measurements
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    row["seconds"] = time.perf_counter() - start
    return row


def _kib(value):
    return "—" if value is None else f"{value / KIB:,.0f} KiB"


def _mib(value):
    return "—" if value is None else f"{value / MIB:.2f} MiB"


def measurement_table(rows):
    lines = [
        "| width | input | arena (bytes) | arena | flash (bytes) | flash | operators | export + measure (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        arena = row["arena_bytes"]
        flash = row["flash_bytes"]
        lines.append(
            f"| {row['width']} | {row['size']} | {'—' if arena is None else f'{arena:,}'} | {_kib(arena)} | "
            f"{'—' if flash is None else f'{flash:,}'} | {_mib(flash)} | {row['operators'] or '—'} | "
            f"{row['seconds']:.0f} |"
        )
    errors = [row for row in rows if row["error"]]
    for row in errors:
        lines.append(f"\nwidth {row['width']} @ {row['size']}: {row['error']}")
    return "\n".join(lines)


def arena_grid(rows, widths, sizes, stop_above_bytes):
    by_key = {(row["width"], row["size"]): row for row in rows}
    lines = ["| width | " + " | ".join(f"{size}×{size}" for size in sizes) + " |"]
    lines.append("|---:|" + "---:|" * len(sizes))
    for width in widths:
        cells = []
        for size in sizes:
            row = by_key.get((width, size))
            if row is None:
                cells.append(f"> {_mib(stop_above_bytes)}")  # not measured: a smaller input already exceeded it
            elif row["arena_bytes"] is None:
                cells.append("error")
            else:
                cells.append(_kib(row["arena_bytes"]))
        lines.append(f"| {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_table(rows, widths):
    lines = ["| width | " + " | ".join(f"RAM {label}" for label, _ in BUDGETS) + " |"]
    lines.append("|---:|" + "---|" * len(BUDGETS))
    for width in widths:
        measured = [row for row in rows if row["width"] == width and row["arena_bytes"] is not None]
        cells = []
        for _, budget in BUDGETS:
            fitting = [row for row in measured if row["arena_bytes"] <= budget]
            if not fitting:
                cells.append("none")
                continue
            best = max(fitting, key=lambda row: row["size"])
            cells.append(
                f"{best['size']}×{best['size']} (arena {_kib(best['arena_bytes'])}, flash {_mib(best['flash_bytes'])})"
            )
        lines.append(f"| {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=list(WIDTHS))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--stop_above_bytes",
        type=int,
        default=2 * MIB,
        help="Stop growing a width's input size once its arena exceeds this (default 2 MiB).",
    )
    parser.add_argument(
        "--attention_norm",
        default=None,
        help="Passed to MobileViTv2 when given (e.g. batch_norm_2d); default: the model's default.",
    )
    parser.add_argument("--output", default=None, help="Also write the markdown to this file.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sizes = sorted(set(args.sizes))

    started = time.perf_counter()
    rows = []
    for width in args.widths:
        for size in sizes:
            row = measure(width, size, args.classes, args.attention_norm)
            rows.append(row)
            print(
                f"width {width} @ {size}: arena {row['arena_bytes']}, flash {row['flash_bytes']} "
                f"({row['seconds']:.0f} s){' ERROR ' + row['error'] if row['error'] else ''}",
                file=sys.stderr,
                flush=True,
            )
            if row["arena_bytes"] is not None and row["arena_bytes"] > args.stop_above_bytes:
                break
    total = time.perf_counter() - started

    import tflite_micro

    version = getattr(tflite_micro, "__version__", "unknown")
    norm = args.attention_norm or "model default"
    text = "\n\n".join(
        [
            f"## TFLite Micro memory of int8 MobileViTv2 ({args.classes} classes, attention norm: {norm})",
            "Measured with the TFLite Micro Python interpreter (tflite-micro "
            f"{version}, reference kernels): arena = RecordingMicroAllocator 'Arena allocation total' "
            "(head + tail) after AllocateTensors; flash = the int8 flatbuffer (model only). "
            "Random non-degenerate weights: neither figure depends on weight values. "
            f"KiB/MiB are 1024-based. Sizes stop growing once the arena exceeds {_mib(args.stop_above_bytes)}. "
            f"Total run time {total / 60:.1f} min.",
            "### Measurements",
            measurement_table(rows),
            "### Arena per width and input size",
            arena_grid(rows, args.widths, sizes, args.stop_above_bytes),
            "### Largest input whose arena fits each RAM budget",
            "The flash column matters too: the model alone needs the flash shown, on top of the TFLM runtime.",
            fit_table(rows, args.widths),
        ]
    )
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
