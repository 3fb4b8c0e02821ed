"""MobileViT (v1) against MobileViTv2 at matched accuracy, on the TFLite CPU runtime.

    python -m benchmarks.v1_v2 [--output_dir benchmark_results] [--threads 2] [--repeats 20] [--tiny]

The MobileViTv2 paper (Mehta & Rastegari, "Separable Self-attention for
Mobile Vision Transformers", 2022) reports MobileViTv2 about 1% more
accurate than MobileViT while 3.2x faster on a mobile device (Core ML on an
iPhone 12). Its pairs at matched accuracy are MobileViT-XS / MobileViTv2-0.75
and MobileViT-S / MobileViTv2-1.0. Here both of a pair run on the LiteRT
interpreter (XNNPACK) at batch 1, float32 and int8, random weights:

* v1: keras-cv-attention-models' `MobileViT_XS` / `MobileViT_S`, a tf_keras
  model, built and converted in a worker process (tf_keras must not share
  the Keras 3 process, see isolation.py) with the shared converter settings
  of `benchmarks.tflite_export` (post-training int8);
* v2: this package, converted with `quantization.tflite_export.convert`
  (float32, PTQ int8) and its QAT int8 (`quantize_model` + `calibrate`, not
  trained).

All models of a pair are timed in turn (`timing.time_interleaved`), so the
machine's drift falls on all alike. MACs are counted from each model's
TensorFlow graph (`macs.py`), split by kind to show where v1's cost lies.

Worker (started by the benchmark): python -m benchmarks.v1_v2 --v1_worker XS --config JSON --output FILE
"""

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import sys
import tempfile

from benchmarks import competitors
from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.latency_common import SEED
from benchmarks.latency_common import random_images
from benchmarks.report import busy_load
from benchmarks.report import busy_note
from benchmarks.report import cpus_text
from benchmarks.report import print_and_write
from benchmarks.report import table
from benchmarks.report import timing_text
from benchmarks.timing import time_interleaved

PAIRS = (("XS", 0.75), ("S", 1.0))  # (MobileViT v1 variant, MobileViTv2 width) at matched accuracy
PAPER_SPEEDUP = 3.2  # v1 / v2 latency, MobileViTv2 paper (Core ML, iPhone 12)
V1 = competitors.BY_KEY["kecam"]  # tf_keras; its pixels are in [0, 1]
V2 = competitors.BY_KEY["keras_mobilevitv2"]  # Keras 3; pixels in [0, 255]
# The table's precisions: (label, v1 variant, v2 variant); v1 has no QAT model, so its PTQ one stands in.
PRECISIONS = (
    ("float32", "float32", "float32"),
    ("int8 (PTQ)", "ptq_int8", "ptq_int8"),
    ("int8 (v2 QAT)", "ptq_int8", "qat_int8"),
)
V2_VARIANTS = ("float32", "ptq_int8", "qat_int8")


@dataclasses.dataclass(frozen=True)
class Config:
    image_size: int = 256
    threads: int = 2
    repeats: int = 20
    warmup: int = 3
    max_seconds: float = 6.0  # timed seconds per model, about
    calibration_images: int = 8  # int8 representative images (latency does not depend on them)
    directory: str = ""  # where the flatbuffers are written
    tiny: bool = False


# A smoke run: tiny images, the first pair only, two timed rounds; its
# figures are not benchmarks. Conversions dominate its time (QAT most).
TINY = dict(image_size=64, repeats=2, warmup=1, max_seconds=0.3, calibration_images=2, tiny=True)


def width_text(width):
    return f"{width:.2f}".rstrip("0") + ("0" if float(width).is_integer() else "")


def config_from_args(args, **overrides):
    values = dict(threads=args.threads)
    if args.tiny:
        values.update(TINY)
    if args.repeats is not None:
        values["repeats"] = args.repeats
    values.update(overrides)
    return Config(**values)


# ---------------------------------------------------------------- models


def mac_split(model):
    """{"macs", "by_kind": {kind: MACs}} of one batch-1 forward pass. A matmul
    between two activations is attention (query x key, score x value); one
    with a weight operand is a dense layer."""
    import tensorflow as tf

    from benchmarks.macs import CALL_OPS
    from benchmarks.macs import op_macs

    shape = (1,) + tuple(model.inputs[0].shape[1:])
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    by_kind = {}
    for op in concrete.graph.get_operations():
        if op.type in CALL_OPS:  # as macs.count_graph_macs: a nested function's MACs would be missed
            raise ValueError(f"{op.name} ({op.type}) calls a nested function")
        macs = op_macs(op)
        if macs:
            by_kind[_mac_kind(op)] = by_kind.get(_mac_kind(op), 0) + macs
    return {"macs": sum(by_kind.values()), "by_kind": by_kind}


def _mac_kind(op):
    if op.type == "Conv2D":
        height, width = op.inputs[1].shape.as_list()[:2]
        return "1x1 conv" if height * width == 1 else f"{height}x{width} conv"
    if op.type == "DepthwiseConv2dNative":
        return "depthwise conv"
    weighted = any(_reads_variable(tensor) for tensor in op.inputs)
    return "dense (matmul with weights)" if weighted else "attention (activation x activation)"


def _reads_variable(tensor):
    # Weights reach a traced op through ReadVariableOp, possibly after a cast,
    # reshape or transpose (Dense on 3-D inputs goes through Tensordot).
    op, hops = tensor.op, 0
    while op.type in ("Identity", "Cast", "Reshape", "Transpose") and hops < 4:
        op, hops = op.inputs[0].op, hops + 1
    return op.type in ("ReadVariableOp", "Const")


def tflite_info(flatbuffer, route, path):
    """Size, converter route and what is left in float inside the model."""
    from quantization.tflite_graph import read_graph

    graph = read_graph(flatbuffer)
    boundary = set(graph.inputs) | set(graph.outputs)
    floats = [t for t in graph.tensors if t.index not in boundary and t.dtype in ("FLOAT32", "FLOAT16")]
    float_ops = sorted(
        {op.name for op in graph.operators if any(graph.tensors[i].dtype == "FLOAT32" for i in op.outputs)}
    )
    counts = {}
    for op in graph.operators:
        counts[op.name] = counts.get(op.name, 0) + 1
    return {
        "path": path,
        "bytes": len(flatbuffer),
        "route": route,
        "float_tensors_inside": len(floats),
        "float_ops": float_ops,
        "ops": len(graph.operators),
        "op_counts": counts,
    }


def _write(directory, name, flatbuffer, route):
    path = os.path.join(directory, name + ".tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return tflite_info(flatbuffer, route, path)


def model_record(name, label, implementation, model):
    """Name, parameters and MACs of a built model; `implementation` is its
    key in `competitors.BY_KEY` (which sets its input range)."""
    split = mac_split(model)
    return {
        "name": name,
        "label": label,
        "implementation": implementation,
        "image_size": int(model.inputs[0].shape[1]),
        "params": int(model.count_params()),
        "macs": split["macs"],
        "macs_by_kind": split["by_kind"],
        "tflite": {},
    }


def export_v1(variant, config):
    """Worker side (tf_keras process): the v1 record with its float32 and
    PTQ int8 flatbuffers written to `config.directory`."""
    from keras_cv_attention_models import mobilevit

    from benchmarks.random_weights import randomize_keras_weights
    from benchmarks.tflite_export import convert_keras_model

    size = config.image_size
    model = getattr(mobilevit, f"MobileViT_{variant}")(pretrained=None, input_shape=(size, size, 3))
    model = randomize_keras_weights(model, seed=SEED)
    name = f"mobilevit_{variant.lower()}"
    record = model_record(name, f"MobileViT-{variant} (kecam)", V1.key, model)
    calibration = random_images(V1, config.calibration_images, size, seed=1)
    for mode, key in (("float32", "float32"), ("int8", "ptq_int8")):
        log(f"{name}: converting {key}")
        flatbuffer, route = convert_keras_model(model, "tf_keras", mode, 1, calibration)
        record["tflite"][key] = _write(config.directory, f"{name}_{key}", flatbuffer, route)
    return record


def build_v2(width, image_size):
    from benchmarks.random_weights import randomize_keras_weights

    return randomize_keras_weights(V2.build(width, image_size), seed=SEED)


def export_v2(model, name, config, variants=V2_VARIANTS):
    """{variant: tflite info} of this package's model; variants among float32,
    ptq_int8, qat_int8 and qat_int8_edgetpu (the QAT graph rewritten for the
    Edge TPU, run on the CPU)."""
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.quantize import rewrite_graph
    from quantization.tflite_export import convert

    calibration = random_images(V2, config.calibration_images, config.image_size, seed=1)
    infos, qat = {}, None
    for variant in variants:
        log(f"{name}: converting {variant}")
        if variant == "float32":
            flatbuffer, route = convert(model, "float32", io_type="float32"), "package float32"
        elif variant == "ptq_int8":
            flatbuffer = convert(model, "ptq_int8", representative_images=calibration)
            route = "package PTQ int8"
        else:
            if qat is None:
                qat = calibrate(quantize_model(model), calibration)
            graph = rewrite_graph(qat, "edgetpu") if variant == "qat_int8_edgetpu" else qat
            flatbuffer = convert(graph, "qat_int8", representative_images=calibration)
            route = "package QAT int8 (calibrated, not trained)"
        infos[variant] = _write(config.directory, f"{name}_{variant}", flatbuffer, route)
    return infos


def v2_record(width, config):
    model = build_v2(width, config.image_size)
    name = f"mobilevitv2_{width:g}"
    record = model_record(name, f"MobileViTv2-{width_text(width)} (this package)", V2.key, model)
    record["tflite"] = export_v2(model, name, config)
    return record


def v1_record_in_worker(variant, config):
    from benchmarks.isolation import run_module

    args = ["--v1_worker", variant, "--config", json.dumps(dataclasses.asdict(config))]
    return run_module("benchmarks.v1_v2", args, environment={"TF_USE_LEGACY_KERAS": "1"})


# ---------------------------------------------------------------- timing


def time_in_turn(entries, config):
    """Times the TFLite models of `entries` ([(record, variant)]) in turn;
    returns {(name, variant): timing dict, or {"reason": why not}}."""
    from benchmarks.runtimes import tflite_runner

    runs, results = {}, {}
    for record, variant in entries:
        key = (record["name"], variant)
        implementation = competitors.BY_KEY[record["implementation"]]
        images = random_images(implementation, 1, record["image_size"], seed=2)
        try:
            with open(record["tflite"][variant]["path"], "rb") as f:
                runs[key] = tflite_runner(f.read(), images, config.threads)
        except Exception as error:  # a model the runtime refuses: reported, the others timed
            results[key] = {"reason": short_reason(error)}
    for key, timing in time_interleaved(runs, config.warmup, config.repeats, config.max_seconds).items():
        results[key] = timing.to_dict()
        log(f"  {key[0]} {key[1]}: median {timing.median_ms:.2f} ms over {timing.runs} rounds")
    del runs
    gc.collect()
    return results


def median_ms(record, variant):
    info = record["tflite"].get(variant) or {}
    return (info.get("timing") or {}).get("median_ms")


def pair_rows(v1, v2):
    """One row per precision: both medians and their quotient (v1 / v2)."""
    rows = []
    for precision, v1_variant, v2_variant in PRECISIONS:
        v1_ms, v2_ms = median_ms(v1, v1_variant), median_ms(v2, v2_variant)
        rows.append(
            {
                "pair": f"{v1['label']} vs {v2['label']}",
                "precision": precision,
                "v1": v1["name"],
                "v1_variant": v1_variant,
                "v1_ms": v1_ms,
                "v2": v2["name"],
                "v2_variant": v2_variant,
                "v2_ms": v2_ms,
                "v1_over_v2": v1_ms / v2_ms if v1_ms and v2_ms else None,
                "paper_v1_over_v2": PAPER_SPEEDUP,
            }
        )
    return rows


def run(config):
    """Builds, converts and times every pair; returns the result dictionary."""
    from benchmarks.competitors import library_versions

    pairs, rows = [], []
    for variant, width in PAIRS[:1] if config.tiny else PAIRS:
        log(f"pair MobileViT-{variant} / MobileViTv2-{width_text(width)} at {config.image_size}x{config.image_size}")
        log(f"MobileViT-{variant}: building and converting in a tf_keras worker, meanwhile MobileViTv2 here")
        # The converters use about one core each: v1's worker and v2's
        # conversions overlap, which nearly halves this phase on 2 idle cores.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            v1_future = pool.submit(v1_record_in_worker, variant, config)
            v2 = v2_record(width, config)
            v1 = v1_future.result()
        gc.collect()
        log(f"timing {len(v1['tflite']) + len(v2['tflite'])} TFLite models in turn")
        entries = [(v1, key) for key in v1["tflite"]] + [(v2, key) for key in v2["tflite"]]
        timings = time_in_turn(entries, config)
        for record in (v1, v2):
            for variant, info in record["tflite"].items():
                info["timing"] = timings[(record["name"], variant)]
                info.pop("path", None)  # a temporary file
        pairs.append({"v1": v1, "v2": v2})
        rows += pair_rows(v1, v2)
    return {
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "pairs": pairs,
        "rows": rows,
    }


def run_section(settings):
    """The "v1_v2" section of `benchmarks.run`, with its timing settings."""
    values = dict(TINY) if settings.tiny else dict(image_size=settings.image_size)
    values.update(threads=settings.threads, warmup=settings.warmup, max_seconds=settings.max_seconds)
    if not settings.tiny:
        values["repeats"] = settings.repeats
    with tempfile.TemporaryDirectory(prefix="v1_v2_") as directory:
        return run(Config(directory=directory, **values))


# ---------------------------------------------------------------- report

ATTENTION = "attention (activation x activation)"
LAYOUT_OPS = ("TRANSPOSE", "RESHAPE", "GATHER", "GATHER_ND")


def _share(record, kind):
    return record["macs_by_kind"].get(kind, 0) / record["macs"] if record["macs"] else 0.0


def _timing_cell(record, variant, busy):
    """`median [p25-p75]`, flagged as the latency section flags its cells
    (report.timing_text: † busy machine, ‡ wide spread)."""
    timing = (record["tflite"].get(variant) or {}).get("timing") or {}
    if timing.get("median_ms") is None:
        return f"n/a ({timing.get('reason', 'not timed')})"
    return timing_text(timing, busy)


def _ratio_cell(value):
    return "-" if value is None else f"{value:.2f}x"


def speed_table(result):
    header = ["pair", "precision", "v1 ms", "v2 ms", "v1 / v2", "paper v1 / v2 (Core ML, iPhone 12)"]
    body, busy = [], busy_load(result)
    for pair, rows in zip(result["pairs"], _rows_by_pair(result)):
        for (_, v1_variant, v2_variant), row in zip(PRECISIONS, rows):
            v1_cell, v2_cell = _timing_cell(pair["v1"], v1_variant, busy), _timing_cell(pair["v2"], v2_variant, busy)
            body.append([row["pair"], row["precision"], v1_cell, v2_cell, _ratio_cell(row["v1_over_v2"]), "3.2x"])
    return table(header, body) + "\n\n" + busy_note(result)


def _op_count(info, names):
    return sum(info["op_counts"].get(name, 0) for name in names)


def model_table(pairs):
    header = ["model", "params (M)", "GMACs", "attention MACs", "3x3 conv MACs", "float ops (layout ops)"]
    header += ["int8 variant", "int8 MB", "int8 route", "float tensors inside int8", "fully int8"]
    body = []
    for pair in pairs:
        for record in (pair["v1"], pair["v2"]):
            float_info = record["tflite"].get("float32", {})
            for variant, info in record["tflite"].items():
                if variant == "float32":
                    continue
                floats = info["float_tensors_inside"]
                body.append(
                    [
                        record["label"],
                        f"{record['params'] / 1e6:.2f}",
                        f"{record['macs'] / 1e9:.3f}",
                        f"{100 * _share(record, ATTENTION):.1f}%",
                        f"{100 * _share(record, '3x3 conv'):.1f}%",
                        f"{float_info.get('ops', '-')} ({_op_count(float_info, LAYOUT_OPS) if float_info else '-'})",
                        variant,
                        f"{info['bytes'] / 1e6:.2f}",
                        info["route"],
                        floats,
                        "yes" if floats == 0 else "no: " + ", ".join(info["float_ops"][:6]),
                    ]
                )
    return table(header, body)


def explanation(result):
    """Why the measured ratio is not the paper's: only measured figures and the paper's own words."""
    lines = [
        f"The paper's {PAPER_SPEEDUP}x was measured with Core ML on an iPhone 12, whose neural engine / GPU run "
        f"the models; here an x86 CPU ({cpus_text(result)}) runs them through XNNPACK with "
        f"{result['config']['threads']} threads. The paper names v1's bottleneck: multi-head self-attention, "
        "O(k^2) in the number of tokens k, with batch-wise matrix multiplications that are costly on "
        "resource-constrained devices. What this run measured for each pair:"
    ]
    for pair, rows in zip(result["pairs"], _rows_by_pair(result)):
        v1, v2 = pair["v1"], pair["v2"]
        measured = ", ".join(f"{r['precision']} {_ratio_cell(r['v1_over_v2'])}" for r in rows)
        v1_float, v2_float = v1["tflite"].get("float32", {}), v2["tflite"].get("float32", {})
        lines.append(
            f"- {v1['label']} vs {v2['label']}: v1 has {v1['macs'] / v2['macs']:.2f}x v2's MACs "
            f"({v1['macs'] / 1e9:.3f} vs {v2['macs'] / 1e9:.3f} G); {100 * _share(v1, ATTENTION):.1f}% of v1's MACs "
            f"are attention matmuls (v2: {100 * _share(v2, ATTENTION):.1f}%) and {100 * _share(v1, '3x3 conv'):.1f}% "
            f"full 3x3 convolutions (stem, local and fusion convs; v2: {100 * _share(v2, '3x3 conv'):.1f}%); v1's "
            f"float graph has {_op_count(v1_float, LAYOUT_OPS)} transpose/reshape/gather ops (patch unfolding) "
            f"against v2's {_op_count(v2_float, LAYOUT_OPS)}, and {_op_count(v1_float, ('BATCH_MATMUL',))} batch "
            f"matmuls against {_op_count(v2_float, ('BATCH_MATMUL',))}. Measured v1 / v2: {measured}."
        )
    lines += [_int8_gain_text(pair) for pair in result["pairs"]]
    lines.append(
        "Time per MAC, v1 / v2 (the measured ratio divided by the MAC ratio; 1.00x: the time follows the MACs): "
        + "; ".join(_per_mac_text(pair, rows) for pair, rows in zip(result["pairs"], _rows_by_pair(result)))
        + "."
    )
    return "\n".join(lines)


def _int8_gain_text(pair):
    """int8 against float for each model of a pair, with the int8 graph's
    activation-by-activation ops (attention) counted."""
    parts = []
    for record in (pair["v1"], pair["v2"]):
        float_ms, int8_ms = median_ms(record, "float32"), median_ms(record, "ptq_int8")
        gain = _ratio_cell(float_ms / int8_ms if float_ms and int8_ms else None)
        int8 = record["tflite"].get("ptq_int8", {})
        parts.append(
            f"{record['label']} float / PTQ int8 time {gain}, its int8 graph holding "
            f"{_op_count(int8, ('BATCH_MATMUL',))} BATCH_MATMUL and {_op_count(int8, ('SOFTMAX',))} SOFTMAX ops"
        )
    return "- " + "; ".join(parts) + " (above 1.00x: int8 is faster)."


def _per_mac_text(pair, rows):
    mac_ratio = pair["v1"]["macs"] / pair["v2"]["macs"]
    cells = ", ".join(
        f"{r['precision']} {_ratio_cell(r['v1_over_v2'] / mac_ratio if r['v1_over_v2'] else None)}" for r in rows
    )
    return f"{pair['v1']['label']} vs {pair['v2']['label']}: {cells}"


def _rows_by_pair(result):
    size = len(PRECISIONS)
    return [result["rows"][i : i + size] for i in range(0, len(result["rows"]), size)]


SECTION_TITLE = "MobileViT (v1) vs MobileViTv2 at matched accuracy, TFLite CPU"


def section_text(section, environment):
    """The section of `benchmarks.run`'s report: its table, or why it is missing."""
    if "error" in section:
        return f"## 6. {SECTION_TITLE}\n\nn/a ({section['error']})"
    return markdown(in_run(section, environment), title=f"## 6. {SECTION_TITLE}", level="###")


def in_run(section, environment):
    """The section with the CPU count of the run that measured it (sections
    of runs before the count was recorded per section)."""
    return dict(section, cpus=section.get("cpus", environment.get("cpus")))


def markdown(result, title=f"# {SECTION_TITLE}", level="##"):
    config = result["config"]
    size = config["image_size"]
    parts = [
        title,
        f"- {size}x{size}, batch 1, LiteRT interpreter (XNNPACK), {config['threads']} threads, random weights; "
        f"median of up to {config['repeats']} rounds, all TFLite models of a pair timed in turn "
        f"(1-minute load average at the end {result['load_average_end']:.2f}, on {cpus_text(result)})",
        "- v1: keras-cv-attention-models MobileViT (tf_keras), post-training int8 with the shared converter "
        "settings; v2: this package, `quantization.tflite_export.convert` (PTQ int8), and its QAT int8 "
        "(calibrated, not trained)",
    ]
    if config["tiny"]:
        parts.append("- **--tiny configuration: a smoke run, not a benchmark.**")
    parts += ["", f"{level} Latency (ms) and v1 / v2", "", speed_table(result), "", f"{level} Models", ""]
    parts += [model_table(result["pairs"]), "", f"{level} Why the ratio is not the paper's 3.2x", ""]
    parts.append(explanation(result))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def add_common_arguments(parser):
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--threads", type=int, default=2, help="TFLite interpreter threads.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds, at most (default 20; --tiny 2).")
    parser.add_argument("--tiny", action="store_true", help="A smoke run on tiny inputs (~1 minute).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--v1_worker", choices=[variant for variant, _ in PAIRS], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.v1_worker:
        record = export_v1(args.v1_worker, Config(**json.loads(args.config)))
        with open(args.output, "w") as f:
            json.dump(record, f)
        return 0
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="v1_v2_") as directory:
        result = run(config_from_args(args, directory=directory))
    print_and_write(result, markdown(result), os.path.join(args.output_dir, "v1_v2"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
