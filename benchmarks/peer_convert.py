"""Worker of `converter_peers.py`: timm's MobileViTv2 to TFLite with one converter.

    python -m benchmarks.peer_convert --task reference|litert_torch|onnx2tf --work_dir DIR
        --widths 0.5 --batch_sizes 1 [--forms stock patched]

Runs in the converter's own virtual environment (torch and the converter,
no TensorFlow of this package), except `--task reference`, which runs in the
package's environment: it saves timm's seeded random weights and timm's
logits on the sample images, so that every converter starts from the same
weights and is judged against the same logits.

Reads DIR/inputs.npz (calibration and sample images, NCHW, in timm's input
range), writes DIR/<peer>_w<width>_b<batch>_<form>_<precision>.tflite and
DIR/<task>.json: one entry per attempt, with the error text when it failed.
The JSON is rewritten after every attempt, so a converter that crashes the
process loses only the attempts not yet made.

Imports only numpy at module level: this runs under two different numpys.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import time
import traceback

import numpy as np

SEED = 0  # benchmarks.latency_common.SEED, which imports nothing heavier
FORMS = ("stock", "patched")
PRECISIONS = ("float32", "int8")
WIDTH_SUFFIXES = {0.5: "050", 0.75: "075", 1.0: "100", 1.25: "125", 1.5: "150", 1.75: "175", 2.0: "200"}


def weights_path(work_dir, width):
    return os.path.join(work_dir, f"timm_w{width:g}.pt")


def reference_path(work_dir, width):
    return os.path.join(work_dir, f"reference_w{width:g}.npy")


def tflite_path(work_dir, peer, width, batch, form, precision):
    return os.path.join(work_dir, f"{peer}_w{width:g}_b{batch}_{form}_{precision}.tflite")


def _timm_model(width):
    import timm

    return timm.create_model(f"mobilevitv2_{WIDTH_SUFFIXES[width]}", pretrained=False).eval()


def load_timm(work_dir, width):
    import torch

    model = _timm_model(width)
    model.load_state_dict(torch.load(weights_path(work_dir, width), weights_only=True))
    return model.eval()


def _broadcast_self_attention(self, x):
    """timm's LinearSelfAttention._forward_self_attn with its last product
    written as plain broadcasting instead of `context_vector.expand_as(value)`:
    the same numbers, but litert-torch's layout pass then converts it."""
    import torch.nn.functional as F

    query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
    context_scores = self.attn_drop(F.softmax(query, dim=-1))
    context_vector = (key * context_scores).sum(dim=-1, keepdim=True)
    out = F.relu(value) * context_vector
    return self.out_drop(self.out_proj(out))


@contextlib.contextmanager
def timm_form(form):
    """timm as shipped ("stock") or with `_broadcast_self_attention` ("patched")."""
    from timm.models import mobilevit

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    original = mobilevit.LinearSelfAttention._forward_self_attn
    if form == "patched":
        mobilevit.LinearSelfAttention._forward_self_attn = _broadcast_self_attention
    try:
        yield
    finally:
        mobilevit.LinearSelfAttention._forward_self_attn = original


def batches(images, batch):
    """`images` in chunks of exactly `batch` (the last filled by repetition)."""
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        yield chunk


def run_reference(args, inputs):
    """Seeded random timm weights (saved) and timm's logits on the samples."""
    import torch

    from benchmarks.random_weights import randomize_torch_weights

    entries = []
    for width in args.widths:
        model = randomize_torch_weights(_timm_model(width), seed=SEED)
        torch.save(model.state_dict(), weights_path(args.work_dir, width))
        with torch.inference_mode():
            logits = model(torch.from_numpy(inputs["samples"])).numpy()
        np.save(reference_path(args.work_dir, width), logits)
        entries.append({"width": width, "status": "ok", "torch": torch.__version__})
    return entries


# --- litert-torch -------------------------------------------------------------------------------------------------


def litert_torch_convert(model, batch, precision, calibration, directory):
    """A flatbuffer from litert-torch: float32, or PT2E int8 (its PT2E
    quantizer, static per-channel int8, calibrated on `calibration`)."""
    import litert_torch
    import torch

    sample = (torch.from_numpy(np.repeat(calibration[:1], batch, 0)),)
    if precision == "float32":
        edge_model = litert_torch.convert(model, sample)
    else:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
        from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        quantizer = PT2EQuantizer().set_global(config)
        prepared = prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
        with torch.no_grad():
            for chunk in batches(calibration, batch):
                prepared(torch.from_numpy(chunk))
        quantized = convert_pt2e(prepared, fold_quantize=False)
        edge_model = litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.tflite")
    edge_model.export(path)
    with open(path, "rb") as f:
        return f.read()


# --- torch.onnx + onnx2tf -------------------------------------------------------------------------------------------


def onnx2tf_convert(model, batch, precision, calibration, directory):
    """A flatbuffer from onnx2tf: ONNX with a static batch, then onnx2tf's
    float32, or its full-integer int8 calibrated from a .npy of images (NHWC,
    mean 0 and std 1: the images are already in timm's input range)."""
    import onnx2tf
    import torch

    os.makedirs(directory, exist_ok=True)
    onnx_path = os.path.join(directory, "model.onnx")
    sample = torch.from_numpy(np.repeat(calibration[:1], batch, 0))
    # torch.onnx.export's default (torch.export-based) exporter, as a user
    # would call it. The TorchScript-based one (dynamo=False) writes timm's
    # GroupNorm as an InstanceNormalization whose scale onnx2tf cannot read
    # ("unsupported type ... onnx_graphsurgeon Variable"), so converts nothing.
    torch.onnx.export(model, (sample,), onnx_path, input_names=["input"], output_names=["logits"], external_data=False)
    options = {}
    if precision == "int8":
        calibration_path = os.path.join(directory, "calibration.npy")
        # onnx2tf feeds the file in slices of the model's (static) batch; a
        # short last slice fails its conversion. Each image is repeated to a
        # whole batch, as this package's converter does, so every batch size
        # sees the same ranges: [N, 3, H, W] -> [N * batch, H, W, 3].
        repeated = np.repeat(calibration, batch, axis=0).transpose(0, 2, 3, 1)
        np.save(calibration_path, np.ascontiguousarray(repeated))
        zeros, ones = np.zeros((1, 1, 1, 3), np.float32), np.ones((1, 1, 1, 3), np.float32)
        options = dict(
            output_integer_quantized_tflite=True,
            quant_type="per-channel",
            custom_input_op_name_np_data_path=[["input", calibration_path, zeros, ones]],
        )
    output_folder = os.path.join(directory, "saved_model")
    with onnx2tf_sample_images(directory):
        onnx2tf.convert(input_onnx_file_path=onnx_path, output_folder_path=output_folder, non_verbose=True, **options)
    # Float I/O with int8 inside is "_integer_quant"; int8 I/O is "_full_integer_quant".
    suffix = "float32" if precision == "float32" else "full_integer_quant"
    path = os.path.join(output_folder, f"model_{suffix}.tflite")
    if not os.path.exists(path):
        # onnx2tf logs a failed conversion as a warning and returns normally.
        raise RuntimeError(f"onnx2tf wrote no model_{suffix}.tflite (its conversion failed; its warning is in the log)")
    with open(path, "rb") as f:
        return f.read()


# onnx2tf checks its conversion on 20 sample images of 128x128 that it
# downloads from GitHub into the working directory, unless the file is already
# there. Offline, a seeded random stand-in of the same name, shape and range
# (float32 in [0, 1]) takes its place; the int8 ranges come from our own
# calibration file either way.
ONNX2TF_SAMPLES = "calibration_image_sample_data_20x128x128x3_float32.npy"


@contextlib.contextmanager
def onnx2tf_sample_images(directory):
    path = os.path.join(directory, ONNX2TF_SAMPLES)
    if not os.path.exists(path):
        np.save(path, np.random.default_rng(SEED).uniform(0, 1, (20, 128, 128, 3)).astype(np.float32))
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def convert_one(task, model, batch, precision, calibration, scratch):
    if task == "litert_torch":
        return litert_torch_convert(model, batch, precision, calibration, scratch)
    return onnx2tf_convert(model, batch, precision, calibration, scratch)


def _error_text(error):
    # The last line that names an error: converters wrap MLIR diagnostics in
    # long messages whose first line is often only "Conversion failed".
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    text = " | ".join((named or lines)[:3])
    # File names relative to site-packages: the environment's path says nothing.
    return re.sub(r"\S*/site-packages/", "", text)[:600]


def run_peer(args, inputs, write):
    entries = []
    for width in args.widths:
        for form in args.forms:
            for batch in args.batch_sizes:
                for precision in PRECISIONS:
                    entry = {"width": width, "batch": batch, "form": form, "precision": precision}
                    print(f"[bench] {args.task} width {width:g} batch {batch} {form} {precision}", file=sys.stderr)
                    start = time.perf_counter()
                    try:
                        with timm_form(form):
                            model = load_timm(args.work_dir, width)
                            scratch = os.path.join(args.work_dir, f"{args.task}_scratch_{form}_{precision}_{batch}")
                            flatbuffer = convert_one(args.task, model, batch, precision, inputs["calibration"], scratch)
                        path = tflite_path(args.work_dir, args.task, width, batch, form, precision)
                        with open(path, "wb") as f:
                            f.write(flatbuffer)
                        entry.update(status="ok", path=path)
                    except Exception as error:  # the error text is the benchmark's result
                        traceback.print_exc()
                        entry.update(status="n/a", reason=_error_text(error))
                    entry["seconds"] = time.perf_counter() - start
                    print(f"[bench]   {entry['status']} {entry.get('reason', '')[:200]}", file=sys.stderr)
                    entries.append(entry)
                    write(entries)
    return entries


def versions():
    from importlib import metadata

    found = {}
    for package in ("torch", "timm", "litert-torch", "ai-edge-litert", "onnx2tf", "onnx", "tensorflow", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=("reference", "litert_torch", "onnx2tf"))
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--widths", type=float, nargs="+", required=True)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", help="Also write the final JSON here (benchmarks.isolation.run_module).")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with np.load(os.path.join(args.work_dir, "inputs.npz")) as data:
        inputs = {name: np.asarray(data[name], np.float32) for name in data.files}
    output = os.path.join(args.work_dir, f"{args.task}.json")

    def write(entries):
        with open(output, "w") as f:
            json.dump({"task": args.task, "versions": versions(), "entries": entries}, f, indent=1)

    write([])
    entries = run_reference(args, inputs) if args.task == "reference" else run_peer(args, inputs, write)
    write(entries)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"task": args.task, "entries": entries}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
