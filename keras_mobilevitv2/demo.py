"""`python -m keras_mobilevitv2.demo`: classify an image and export to TFLite.

Builds a MobileViTv2, loads weights (a file you give, the cached ImageNet
weights, or random weights when neither is available - said so loudly),
classifies an image with the reference evaluation crop, then converts the
model to a float TFLite flatbuffer, checks it (builtin ops only, every tensor
rank <= 4, same predictions as Keras) and times both.
"""

import argparse
import os
import sys
import time

import numpy as np


def _synthetic_image(size=320, seed=0):
    """A deterministic RGB test card (gradients, disc, stripes), uint8."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([x, y, 1 - x * y], axis=-1)
    disc = (x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05
    image[disc] = (0.9, 0.2, 0.1)
    image[(np.sin(40 * x) > 0.6) & (y > 0.7)] = (0.1, 0.1, 0.1)
    image += rng.rand(size, size, 3) * 0.05
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _median_ms(fn, repeats):
    fn()  # warm-up (tracing, allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_mobilevitv2.config import WIDTHS

    widths = sorted(WIDTHS.values())
    parser = argparse.ArgumentParser(prog="mobilevitv2-demo", description=__doc__.split("\n")[0])
    # choices: argparse then names the accepted widths instead of a KeyError
    # deep in the weights lookup.
    parser.add_argument(
        "--width",
        type=float,
        default=0.5,
        choices=widths,
        metavar="WIDTH",
        help=f"Width multiplier, one of {', '.join(map(str, widths))}.",
    )
    parser.add_argument("--weights", default=None, help="Weights file (.weights.h5, .pt, .safetensors).")
    parser.add_argument("--image", default=None, help="Image file (JPEG/PNG/BMP/GIF); default: a test card.")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--output_dir", default="demo_output", help="Where the .tflite file goes.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed runs per runtime.")
    args = parser.parse_args(argv)

    import tensorflow as tf

    import keras_mobilevitv2
    from keras_mobilevitv2 import weights as weights_lib

    shape = (args.image_size, args.image_size, 3)
    weights, note = args.weights, None
    if weights is None:
        try:
            weights = weights_lib.imagenet_weights_path(args.width)
            note = f"ImageNet-1k weights ({weights})"
        except OSError as error:
            weights = None
            note = f"RANDOM weights: no verified ImageNet weights available here.\n  ({error})"
    else:
        note = f"weights from {weights}"

    print(f"[1/4] Building MobileViTv2-{args.width} at {shape[0]}x{shape[1]} with {note}")
    model = keras_mobilevitv2.MobileViTv2(args.width, weights=None, input_shape=shape)
    if weights is not None:
        from keras_mobilevitv2.weights import load_weights_into

        try:
            load_weights_into(model, weights, args.width)
        except ImportError as error:  # a .bin/.pt checkpoint without PyTorch
            if args.weights is not None:
                raise SystemExit(f"error: {error}") from None
            print(f"      RANDOM weights after all: {error}")
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    print(f"      {params:,} parameters")

    if args.image:
        image = tf.io.decode_image(tf.io.read_file(args.image), channels=3, expand_animations=False)
        source = args.image
    else:
        image, source = _synthetic_image(), "synthetic test card"
    batch = keras_mobilevitv2.eval_transform(image, args.image_size, round(args.image_size / 0.888))[None]
    batch = batch.numpy()
    print(f"[2/4] Classifying {source} (resize {round(args.image_size / 0.888)}, center crop {args.image_size})")
    probabilities = model.predict_on_batch(batch)
    for rank, (wnid, label, score) in enumerate(keras_mobilevitv2.decode_predictions(probabilities, top=5)[0], 1):
        print(f"      {rank}. {label:<28} {wnid}  {score:.4f}")

    print("[3/4] Converting to float TFLite (builtin ops only) and auditing")
    import tempfile

    with tempfile.TemporaryDirectory() as saved_model_dir:
        model.export(saved_model_dir, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"{model.name}_float32.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    import warnings

    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    # Without the default delegate the op list shows real ops, not DELEGATE.
    plain = tf.lite.Interpreter(
        model_content=flatbuffer,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    plain.allocate_tensors()
    ops = sorted({op["op_name"] for op in plain._get_ops_details()})
    max_rank = max(len(t["shape"]) for t in plain.get_tensor_details())
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run_tflite():
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    tflite_probabilities = run_tflite()
    difference = float(np.abs(tflite_probabilities - probabilities).max())
    same_top1 = int(np.argmax(tflite_probabilities)) == int(np.argmax(probabilities))
    print(f"      {path}: {len(flatbuffer) / 1e6:.2f} MB, max tensor rank {max_rank}")
    print(f"      ops: {', '.join(ops)}")
    print(f"      TFLite vs Keras: max |diff| {difference:.2e}, same top-1: {same_top1}")

    print(f"[4/4] Latency, batch 1, median of {args.repeats} (this machine: {os.cpu_count()} CPUs)")
    predict = tf.function(lambda x: model(x, training=False))
    keras_ms = _median_ms(lambda: predict(batch).numpy(), args.repeats)
    tflite_ms = _median_ms(run_tflite, args.repeats)
    print(f"      Keras (tf.function): {keras_ms:.1f} ms   TFLite float32 (XNNPACK): {tflite_ms:.1f} ms")

    ok = max_rank <= 4 and same_top1 and difference < 1e-3
    print("OK" if ok else "FAILED: TFLite model disagrees with Keras or has rank > 4 tensors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
