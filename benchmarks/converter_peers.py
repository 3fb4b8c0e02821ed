"""timm's PyTorch MobileViTv2 converted to TFLite by Google's converters, as peers.

    python -m benchmarks.converter_peers [--widths 0.5 1.0] [--batch_sizes 1 16] [--image_size 256]
        [--envs_dir ~/.cache/keras_mobilevitv2/peer_envs] [--work_dir DIR] [--output PREFIX]

What a user comparing this package would try first: timm's `mobilevitv2_XXX`
converted to TFLite with

* litert-torch (formerly ai-edge-torch): float32, and int8 through its PT2E
  quantizer (full int8, calibrated);
* torch.onnx.export then onnx2tf: float32, and onnx2tf's full-integer int8
  (calibrated from an image file).

Each converter pins its own torch, tensorflow and numpy, which conflict with
this package's environment, so each runs in its own virtual environment,
created here on first use (`ensure_env`) and reused afterwards; nothing is
installed into the package's environment. There `peer_convert.py` converts
timm's model twice: as timm ships it ("stock") and with the one line of its
LinearSelfAttention that litert-torch cannot lay out rewritten as plain
broadcasting ("patched").

Back in this process every .tflite is read (ops, float tensors inside an int8
model, the largest tensor rank, custom ops), run with the LiteRT interpreter
against timm's own logits on the same weights and images (top-1 agreement,
largest error relative to the logit range; a constant output is flagged), and
timed in turn with this package's float, PTQ int8 and QAT int8 models of the
same width and batch. A converter that fails, or a model LiteRT refuses,
shows as "n/a (reason)"; a model whose outputs disagree with timm's is
marked wrong rather than reported as fast.
"""

import argparse
import collections
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

from benchmarks import competitors
from benchmarks import peer_convert
from benchmarks.console import PREFIX
from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.isolation import REPOSITORY_ROOT
from benchmarks.isolation import WorkerError

DEFAULT_ENVS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "keras_mobilevitv2", "peer_envs")
READY_FILE = "peer_requirements.txt"
# The torch and torchvision of this package's environment (a matching pair:
# torchvision's C++ ops fail to load against another torch build, and timm
# imports torchvision), installed again in each converter's environment.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31")


@dataclasses.dataclass(frozen=True)
class Peer:
    key: str  # the environment's directory name, and the worker's --task
    label: str
    requirements: tuple


PEERS = (
    Peer("litert_torch", "litert-torch 0.10.0", ("litert-torch==0.10.0",) + TORCH_PINS),
    # onnx2tf pins tensorflow 2.19, onnx 1.19 and numpy 1.26 itself.
    Peer("onnx2tf", "torch.onnx + onnx2tf 1.29.24", ("onnx2tf==1.29.24", "onnxscript==0.7.2") + TORCH_PINS),
)
BY_KEY = {peer.key: peer for peer in PEERS}


def env_python(envs_dir, peer):
    return os.path.join(envs_dir, peer.key, "bin", "python")


def requirements_text(peer):
    return "\n".join(peer.requirements) + "\n"


def env_is_ready(envs_dir, peer):
    """True when the environment exists and was installed with exactly these
    pins (the marker is written only after pip succeeded)."""
    marker = os.path.join(envs_dir, peer.key, READY_FILE)
    if not (os.path.exists(env_python(envs_dir, peer)) and os.path.exists(marker)):
        return False
    with open(marker) as f:
        return f.read() == requirements_text(peer)


def _run_logged(command, log_path, timeout_s):
    # Without PYTHONPATH: pip would otherwise see (and check) this repository's packages.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with open(log_path, "a") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        log_file.flush()
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s, env=env)
    if result.returncode != 0:
        with open(log_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "Error" in line]
        raise RuntimeError((errors or lines or ["no output"])[-1])


def ensure_env(envs_dir, peer, python="python3.11", timeout_s=3600):
    """The peer's interpreter, creating its environment first if needed.

    Raises RuntimeError with pip's last error line when it cannot be
    installed (the benchmark's n/a reason)."""
    if env_is_ready(envs_dir, peer):
        return env_python(envs_dir, peer)
    directory = os.path.join(envs_dir, peer.key)
    os.makedirs(envs_dir, exist_ok=True)
    log_path = os.path.join(envs_dir, f"{peer.key}.install.log")
    log(f"creating {directory} ({', '.join(peer.requirements)}); pip log: {log_path}")
    if os.path.exists(log_path):
        os.remove(log_path)  # the reason is read from this attempt's log only
    _run_logged([python, "-m", "venv", "--clear", directory], log_path, timeout_s)
    _run_logged([env_python(envs_dir, peer), "-m", "pip", "install", *peer.requirements], log_path, timeout_s)
    with open(os.path.join(directory, READY_FILE), "w") as f:
        f.write(requirements_text(peer))
    return env_python(envs_dir, peer)


# --- the worker processes ------------------------------------------------------------------------------------------

SAMPLE_IMAGES = 8  # agreement with timm: enough for top-1 agreement to mean something, cheap at batch 16


def write_inputs(work_dir, image_size, calibration_count, sample_count=SAMPLE_IMAGES):
    """Seeded calibration and sample images in timm's input range (NCHW),
    as the workers read them; returns them."""
    from benchmarks.latency_common import random_images

    timm = competitors.BY_KEY["timm"]
    inputs = {
        "calibration": random_images(timm, calibration_count, image_size, seed=1, channels_first=True),
        "samples": random_images(timm, sample_count, image_size, seed=3, channels_first=True),
    }
    os.makedirs(work_dir, exist_ok=True)
    np.savez(os.path.join(work_dir, "inputs.npz"), **inputs)
    return inputs


def run_worker(python, task, work_dir, settings, forms=peer_convert.FORMS, timeout_s=7200):
    """Runs `peer_convert` with `python`; returns its JSON. Raises WorkerError
    when it wrote nothing; a worker that died part way returns what it wrote
    (the caller marks the missing attempts)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPOSITORY_ROOT  # only this repository: the peer's own site-packages otherwise
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = [python, "-m", "benchmarks.peer_convert", "--task", task, "--work_dir", work_dir]
    command += ["--widths", *map(repr, settings.widths), "--batch_sizes", *map(str, settings.batch_sizes)]
    command += ["--forms", *forms, "--threads", str(settings.threads)]
    output = os.path.join(work_dir, f"{task}.json")
    if os.path.exists(output):
        os.remove(output)
    tail = collections.deque(maxlen=40)
    with open(os.path.join(work_dir, f"{task}.log"), "w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(timeout_s, process.kill)
        watchdog.start()
        try:
            for line in process.stderr:
                log_file.write(line)
                tail.append(line.strip())
                if line.startswith(PREFIX):
                    sys.stderr.write("  " + line)
        finally:
            watchdog.cancel()
            returncode = process.wait()
    if not os.path.exists(output):
        raise WorkerError(_last_error(tail) or f"worker exited with status {returncode}")
    with open(output) as f:
        result = json.load(f)
    if returncode != 0:
        result["died"] = _last_error(tail) or f"worker exited with status {returncode}"
    return result


def _last_error(tail):
    errors = [line for line in tail if line and not line.startswith(PREFIX) and ("Error" in line or "error" in line)]
    return errors[-1] if errors else None


def planned_attempts(settings, forms=peer_convert.FORMS):
    return [
        {"width": width, "batch": batch, "form": form, "precision": precision}
        for width in settings.widths
        for form in forms
        for batch in settings.batch_sizes
        for precision in peer_convert.PRECISIONS
    ]


def peer_entries(peer, settings, envs_dir, work_dir, ensure=None, run=None):
    """One entry per planned attempt of `peer`: the worker's, or n/a with the
    reason the environment or the worker failed. `ensure` and `run` replace
    `ensure_env` and `run_worker` (tests)."""
    ensure, run = ensure or ensure_env, run or run_worker
    planned = planned_attempts(settings)
    try:
        python = ensure(envs_dir, peer)
    except Exception as error:
        reason = f"environment not installable: {short_reason(error)}"
        return [dict(attempt, status="n/a", reason=reason) for attempt in planned], {}
    try:
        result = run(python, peer.key, work_dir, settings)
    except Exception as error:
        return [dict(attempt, status="n/a", reason=short_reason(error)) for attempt in planned], {}
    done = {_attempt_key(entry): entry for entry in result.get("entries", [])}
    missing = f"not reached: worker died ({result.get('died', 'unknown')})"
    entries = [done.get(_attempt_key(attempt), dict(attempt, status="n/a", reason=missing)) for attempt in planned]
    return entries, result.get("versions", {})


def _attempt_key(entry):
    return (float(entry["width"]), int(entry["batch"]), entry["form"], entry["precision"])


# --- what is inside a model, and whether it computes timm's logits ------------------------------------------------


SELF_DIFFERENCE_OPS = ("SUB", "SQUARED_DIFFERENCE")


def self_differences(flatbuffer):
    """Operators that subtract a tensor from itself: always 0. A converter
    that lost a norm's mean leaves one per norm (x - x)."""
    from quantization.tflite_graph import read_graph

    return sum(
        1
        for operator in read_graph(flatbuffer).operators
        if operator.name in SELF_DIFFERENCE_OPS and len(set(operator.present_inputs)) == 1
    )


def structure_warning(structure):
    """What is wrong with a model by construction, or ""."""
    count = (structure or {}).get("self_differences", 0)
    if not count:
        return ""
    return f"{count} SUB/SQUARED_DIFFERENCE ops subtract a tensor from itself (always 0: x - x where x - mean belongs)"


def structure_summary(flatbuffer):
    """Ops, float tensors inside (not the model's inputs/outputs), the largest
    tensor rank, custom ops, operators that subtract a tensor from itself,
    and the input's layout and dtype."""
    from benchmarks.tflite_export import float_tensors_inside
    from quantization.audit import read_structure

    structure = read_structure(flatbuffer)
    names = [name for name, _ in structure["ops"]]
    input_tensor = structure["tensors"][structure["inputs"][0]]
    return {
        "bytes": len(flatbuffer),
        "ops": len(names),
        "op_counts": dict(collections.Counter(names).most_common()),
        "float_tensors_inside": float_tensors_inside(flatbuffer),
        "max_rank": max((len(tensor["shape"]) for tensor in structure["tensors"]), default=0),
        "custom_ops": sorted({name for name in names if name.startswith("CUSTOM") or name == "FLEX"}),
        "self_differences": self_differences(flatbuffer),
        "input_shape": input_tensor["shape"],
        "input_dtype": input_tensor["dtype"],
    }


def channels_first(input_shape):
    """True for an NCHW image input ([N, 3, H, W] with H, W not 3)."""
    return len(input_shape) == 4 and input_shape[1] == 3 and input_shape[3] != 3


def in_layout(images_nchw, input_shape):
    images = np.asarray(images_nchw, np.float32)
    return images if channels_first(input_shape) else np.ascontiguousarray(images.transpose(0, 2, 3, 1))


# A model is "wrong" when its top-1 agrees with timm's on fewer than half the
# samples AND its largest error exceeds this share of timm's logit range:
# int8 on random weights flips close calls, it does not move logits by a
# quarter of their range.
WRONG_RELATIVE_ERROR = 0.25


def agreement(actual, expected):
    """Agreement of a model's logits with timm's; `verdict` is None when they
    agree, else why the model is wrong."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return {"verdict": f"output shape {list(actual.shape)}, timm's {list(expected.shape)}"}
    logit_range = float(np.ptp(expected)) or 1.0
    finite = bool(np.isfinite(actual).all())
    error = float(np.abs(actual - expected).max()) if finite else float("inf")
    result = {
        "top1_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
        "max_abs_error": error,
        "relative_max_error": error / logit_range,
        "all_zero": bool(finite and not actual.any()),
        "constant_output": bool(finite and np.ptp(actual) == 0),
    }
    if not finite:
        verdict = "non-finite outputs"
    elif result["all_zero"]:
        verdict = "all-zero outputs"
    elif result["constant_output"]:
        verdict = "constant outputs"
    elif result["top1_agreement"] < 0.5 and result["relative_max_error"] > WRONG_RELATIVE_ERROR:
        verdict = "disagrees with timm"
    else:
        verdict = None
    return dict(result, verdict=verdict)


def check_model(flatbuffer, samples_nchw, expected):
    """(structure, agreement) of a peer's model; raises when LiteRT refuses it."""
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite

    structure = structure_summary(flatbuffer)
    interpreter = make_interpreter(flatbuffer, use_xnnpack=True)
    actual = run_tflite(interpreter, in_layout(samples_nchw, structure["input_shape"]))
    return structure, agreement(actual.reshape(len(actual), -1), expected)


# --- rows: the peers' models, and ours at the same width and batch ------------------------------------------------

OURS_RUNTIMES = (("tflite_float", "float32"), ("tflite_int8", "int8"), ("tflite_int8_qat", "int8 QAT"))
OURS_LABEL = "keras_mobilevitv2 (this package)"


def make_row(converter, label, form, precision, width, batch, status="pending", reason="", path=None, **extra):
    row = {"converter": converter, "label": label, "form": form, "precision": precision, "width": width}
    row.update(batch=batch, status=status, reason=reason, path=path, structure=None, agreement=None, timing=None)
    return dict(row, **extra)


def peer_rows(peer, entries):
    return [
        make_row(
            peer.key,
            peer.label,
            entry["form"],
            entry["precision"],
            entry["width"],
            entry["batch"],
            status="pending" if entry["status"] == "ok" else "n/a",
            reason=entry.get("reason", ""),
            path=entry.get("path"),
            convert_seconds=entry.get("seconds"),
        )
        for entry in entries
    ]


def judge_in_worker(row, work_dir, timeout_s=600):
    """`check_model` of a row's model in a fresh process of this environment:
    a model can abort LiteRT itself (onnx2tf's int8 model dies in
    allocate_tensors with SIGABRT), which must cost one row, not the run."""
    from benchmarks.isolation import run_module

    args = ["--judge", row["path"], "--work_dir", work_dir, "--width", repr(row["width"])]
    result = run_module("benchmarks.converter_peers", args, timeout_s=timeout_s)
    return result["structure"], result["agreement"]


def judge_peer_rows(rows, judge):
    """Structure and agreement with timm of every converted peer model
    (`judge(row)` -> (structure, agreement)); a model LiteRT refuses or dies
    on becomes n/a, one whose logits disagree with timm's becomes "wrong"."""
    for row in rows:
        if row["status"] != "pending":
            continue
        log(f"{row['converter']} width {row['width']:g} batch {row['batch']} {row['form']} {row['precision']}: vs timm")
        try:
            row["structure"], row["agreement"] = judge(row)
        except Exception as error:  # refused at allocate/prepare/invoke, or a crash: the converter's result
            row.update(status="n/a", reason=refusal_reason(error))
            row["structure"] = _structure_of_file(row["path"])
        if row["agreement"] and row["agreement"]["verdict"]:
            row.update(status="wrong", reason=row["agreement"]["verdict"])
        warning = structure_warning(row["structure"])
        if warning and row["status"] != "pending":
            row["reason"] = f"{row['reason']}; {warning}"
        log(f"  {row['status']}: {row['reason']}" if row["reason"] else "  agrees")
    return rows


def _structure_of_file(path):
    # Reading the flatbuffer needs no interpreter: shown for refused models too.
    try:
        with open(path, "rb") as f:
            return structure_summary(f.read())
    except Exception:  # not a flatbuffer at all
        return None


def refusal_reason(error):
    # A judging worker's error is LiteRT's own message, or how the process died.
    text = str(error) if isinstance(error, WorkerError) else short_reason(error)
    if "killed by signal" in text:
        return f"LiteRT crashes on the model ({text})"
    return f"LiteRT refuses the model: {text}"


def judge_main(path, work_dir, width, output):
    """The `--judge` worker: `check_model` on one file, written as JSON."""
    with np.load(os.path.join(work_dir, "inputs.npz")) as data:
        samples = np.asarray(data["samples"], np.float32)
    expected = np.load(peer_convert.reference_path(work_dir, width))
    with open(path, "rb") as f:
        structure, agreement = check_model(f.read(), samples, expected)
    with open(output, "w") as f:
        json.dump({"structure": structure, "agreement": agreement}, f)
    return 0


def our_rows(width, settings, work_dir):
    """This package's float, PTQ int8 and QAT int8 models of `width`, exported
    as the latency section exports them (`TFLiteExporter`)."""
    from benchmarks.latency_common import SEED
    from benchmarks.latency_common import random_images
    from benchmarks.random_weights import randomize_keras_weights
    from benchmarks.tflite_export import TFLiteExporter

    ours = competitors.BY_KEY["keras_mobilevitv2"]
    model = randomize_keras_weights(ours.build(width, settings.image_size), seed=SEED)
    calibration = random_images(ours, settings.calibration_images, settings.image_size, seed=1)
    exporter = TFLiteExporter(ours, model, calibration)
    rows = []
    for batch in settings.batch_sizes:
        for runtime, precision in OURS_RUNTIMES:
            if runtime == "tflite_int8_qat" and not settings.qat:
                continue
            row = make_row(ours.key, OURS_LABEL, "-", precision, width, batch)
            log(f"{ours.key} width {width:g} batch {batch}: {runtime}")
            try:
                flatbuffer, _ = exporter.export(runtime, batch)
                row["path"] = os.path.join(work_dir, f"ours_w{width:g}_b{batch}_{runtime}.tflite")
                with open(row["path"], "wb") as f:
                    f.write(flatbuffer)
                row["structure"] = structure_summary(flatbuffer)
            except Exception as error:
                row.update(status="n/a", reason=short_reason(error))
            rows.append(row)
    return rows


def _runner(row, settings):
    from benchmarks.latency_common import random_images
    from benchmarks.runtimes import tflite_runner

    with open(row["path"], "rb") as f:
        flatbuffer = f.read()
    if row["converter"] == "keras_mobilevitv2":
        images = random_images(competitors.BY_KEY["keras_mobilevitv2"], row["batch"], settings.image_size, seed=2)
    else:
        timm = competitors.BY_KEY["timm"]
        nchw = random_images(timm, row["batch"], settings.image_size, seed=2, channels_first=True)
        images = in_layout(nchw, row["structure"]["input_shape"])
    return tflite_runner(flatbuffer, images, settings.threads)


def time_rows(rows, settings):
    """Times every pending row: per (width, batch), ours and the peers' models
    in turn (`timing.time_interleaved`), as the latency section does."""
    from benchmarks.timing import time_interleaved

    groups = collections.defaultdict(list)
    for row in rows:
        if row["status"] == "pending":
            groups[(row["width"], row["batch"])].append(row)
    for (width, batch), group in sorted(groups.items()):
        log(f"TFLite width {width:g} batch {batch}: {len(group)} models in turn")
        runs = {}
        for index, row in enumerate(group):
            try:
                runs[index] = _runner(row, settings)
            except Exception as error:
                row.update(status="n/a", reason=f"LiteRT refuses the model: {short_reason(error)}")
        try:
            timings = time_interleaved(runs, settings.warmup, settings.repeats, settings.max_seconds)
        except Exception as error:
            timings = {}
            for index in runs:
                group[index].update(status="n/a", reason=short_reason(error))
        for index, timing in timings.items():
            group[index].update(status="ok", timing=timing.to_dict())
            log(
                f"  {group[index]['converter']} {group[index]['form']} {group[index]['precision']}: "
                f"median {timing.median_ms:.2f} ms"
            )
        del runs
        gc.collect()
    return rows


# --- the section -----------------------------------------------------------------------------------------------------


def measure(settings, envs_dir, work_dir, peers=PEERS, reuse=False):
    """(rows, peer versions): converts, judges and times everything in
    `work_dir`; with `reuse`, conversions already there are kept."""
    from benchmarks.isolation import run_module

    inputs_path = os.path.join(work_dir, "inputs.npz")
    if not (reuse and os.path.exists(inputs_path)):
        write_inputs(work_dir, settings.image_size, settings.calibration_images)
    # timm's weights and logits come from this package's environment, in a
    # worker: PyTorch must not share this (TensorFlow) process.
    if not (reuse and all(os.path.exists(peer_convert.reference_path(work_dir, w)) for w in settings.widths)):
        reference_args = ["--task", "reference", "--work_dir", work_dir, "--widths", *map(repr, settings.widths)]
        run_module("benchmarks.peer_convert", reference_args)
    rows, versions = [], {}
    for peer in peers:
        run = reused_worker if reuse and _converted_already(peer, settings, work_dir) else None
        entries, versions[peer.key] = peer_entries(peer, settings, envs_dir, work_dir, run=run)
        rows += peer_rows(peer, entries)
    judge_peer_rows(rows, lambda row: judge_in_worker(row, work_dir))
    for width in settings.widths:
        rows += our_rows(width, settings, work_dir)
        gc.collect()
    return time_rows(rows, settings), versions


def _converted_already(peer, settings, work_dir):
    """Whether an earlier run left every attempt `settings` plans for `peer` in
    `work_dir` (a new width or batch size needs the worker again)."""
    path = os.path.join(work_dir, f"{peer.key}.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        done = {_attempt_key(entry) for entry in json.load(f).get("entries", [])}
    return all(_attempt_key(attempt) in done for attempt in planned_attempts(settings))


def reused_worker(python, task, work_dir, settings):
    """`run_worker`'s result as an earlier run left it in `work_dir`."""
    with open(os.path.join(work_dir, f"{task}.json")) as f:
        return json.load(f)


def run_section(settings):
    """The "converters" section of `benchmarks.run`: {rows, versions}."""
    envs_dir = settings.peer_envs_dir or DEFAULT_ENVS_DIR
    if settings.peer_work_dir:
        rows, versions = measure(settings, envs_dir, settings.peer_work_dir, reuse=settings.peer_reuse)
    else:
        with tempfile.TemporaryDirectory(prefix="benchmark_peers_") as work_dir:
            rows, versions = measure(settings, envs_dir, work_dir)
    for row in rows:
        row.pop("path", None)  # a temporary file
    section = {"rows": rows, "versions": versions, "envs_dir": envs_dir}
    if settings.peer_work_dir and settings.peer_reuse:
        section["reused_conversions_from"] = settings.peer_work_dir
    return section


# --- the report ------------------------------------------------------------------------------------------------------

TITLE = "5. timm converted to TFLite by Google's converters"
HEADER = (
    "converter",
    "form",
    "precision",
    "width",
    "batch",
    "median ms",
    "ours / peer",
    "ops",
    "float tensors inside",
    "max rank",
    "custom ops",
    "top-1 vs timm",
    "max abs error (of logit range)",
)


def _ours_ms(rows, row):
    from benchmarks.report import find_row
    from benchmarks.report import median_ms

    # A peer's int8 model is compared with our PTQ int8 (also calibrated, not trained).
    key = {name: row[name] for name in ("width", "batch", "precision")}
    return median_ms(find_row(rows, converter="keras_mobilevitv2", **key))


def _share(value):
    return f"{value:.1%}" if value >= 0.001 else "<0.1%"


def _status_cell(row):
    from benchmarks.report import median_ms
    from benchmarks.report import ms

    if row["status"] == "ok":
        return ms(median_ms(row))
    return f"{row['status']} ({row['reason'][:70].replace('|', '/')})"


def table_row(rows, row):
    from benchmarks.report import median_ms
    from benchmarks.report import ratio

    structure, agreement = row.get("structure") or {}, row.get("agreement") or {}
    ours = row["converter"] == "keras_mobilevitv2"
    error = agreement.get("max_abs_error")
    return (
        row["label"],
        row["form"],
        row["precision"],
        f"{row['width']:g}",
        row["batch"],
        _status_cell(row),
        "-" if ours or row["status"] != "ok" else ratio(_ours_ms(rows, row), median_ms(row)),
        structure.get("ops", "-"),
        structure.get("float_tensors_inside", "-"),
        structure.get("max_rank", "-"),
        ", ".join(structure.get("custom_ops", [])) or ("none" if structure else "-"),
        f"{agreement['top1_agreement']:.0%}" if "top1_agreement" in agreement else "-",
        f"{error:.3g} ({_share(agreement['relative_max_error'])})" if error is not None else "-",
    )


def section_text(section, environment=None):
    from benchmarks.report import table

    if isinstance(section, dict) and "error" in section:
        return f"## {TITLE}\n\nn/a ({section['error']})"
    rows = section["rows"]
    lines = [
        f"## {TITLE}",
        "",
        "timm's MobileViTv2 (seeded random weights) converted by each converter in its own environment "
        f"(`{section['envs_dir']}`): *stock* is timm as shipped, *patched* has `context_vector.expand_as(value)` in "
        "LinearSelfAttention written as plain broadcasting. Every model is run by LiteRT on the same sample images "
        "as timm: *wrong* means its logits disagree with timm's (constant/all-zero output, or top-1 agreement "
        f"under 50% with an error over {WRONG_RELATIVE_ERROR:.0%} of the logit range), so it is not timed. "
        "Models of one width and batch are timed in turn with this package's; ours / peer under 1 means ours "
        "is faster (int8: against our PTQ int8).",
        "",
        table(HEADER, [table_row(rows, row) for row in rows]),
    ]
    if section.get("reused_conversions_from"):
        lines[-1:-1] = [
            f"The peers' conversions are an earlier run's, kept in `{section['reused_conversions_from']}` "
            "(`--peer_reuse`; same seeded weights and converter environments); their judging and every timing "
            "are this run's.",
            "",
        ]
    failed = [row for row in rows if row["status"] in ("n/a", "wrong") and len(row["reason"]) > 70]
    if failed:
        lines += ["", "Full reasons:"]
        seen = set()
        for row in failed:
            if row["reason"] not in seen:
                seen.add(row["reason"])
                lines.append(f"- {row['label']} {row['form']} {row['precision']}: {row['reason'][:400]}")
    versions = section.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + "; ".join(f"{key}: {_versions_text(found)}" for key, found in versions.items())]
    return "\n".join(lines)


def _versions_text(found):
    return ", ".join(f"{name} {version}" for name, version in found.items()) or "not installed"


def main(argv=None):
    from benchmarks.settings import parse_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--envs_dir", default=DEFAULT_ENVS_DIR)
    parser.add_argument("--work_dir", default="", help="Keep the models and worker logs here (default: temporary).")
    parser.add_argument("--output", default="", help="Write OUTPUT.json and OUTPUT.md.")
    parser.add_argument("--only_envs", action="store_true", help="Create the environments and stop.")
    parser.add_argument("--reuse", action="store_true", help="Keep the conversions already in --work_dir.")
    parser.add_argument("--judge", help=argparse.SUPPRESS)  # worker: check one .tflite (judge_in_worker)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.judge:
        return judge_main(args.judge, args.work_dir, args.width, args.output)
    if args.only_envs:
        for peer in PEERS:
            try:
                log(f"{peer.key}: {ensure_env(args.envs_dir, peer)}")
            except Exception as error:
                log(f"{peer.key}: n/a ({short_reason(error)})")
        return 0
    settings, _ = parse_settings(rest + ["--sections", "converters"])
    if args.reuse and not args.work_dir:
        parser.error("--reuse needs --work_dir")
    settings = dataclasses.replace(
        settings, peer_envs_dir=args.envs_dir, peer_work_dir=args.work_dir, peer_reuse=args.reuse
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from benchmarks.runtimes import configure_tensorflow_threads

    configure_tensorflow_threads(settings.threads)
    section = run_section(settings)
    text = section_text(section)
    print(text)
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump(section, f, indent=2)
        with open(args.output + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
