"""Training throughput, images/s at 256x256: this trainer vs timm's training step.

    python -m benchmarks.training_throughput [--widths 0.5 1.0] [--batch_size 16] [--steps 8]

Both sides run a full optimizer step (forward, backward, AdamW, label
smoothing, gradient clipping) on the same machine in the same run. This
package's figure is the trainer's own measured rate (its data pipeline
included, first step excluded); timm's is a loop over synthetic tensors (no
data pipeline), so the comparison favours timm slightly.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

SUFFIX = {0.5: "050", 0.75: "075", 1.0: "100", 1.25: "125", 1.5: "150", 1.75: "175", 2.0: "200"}


def timm_training_rate(width, batch_size, steps, image_size, threads):
    import timm
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(f"mobilevitv2_{SUFFIX[width]}", num_classes=1000).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start), device


def trainer_rate(width, batch_size, steps, image_size, dataset_dir):
    from training import TrainConfig
    from training import Trainer

    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig(
            model=f"mobilevitv2_{SUFFIX[width]}",
            data="embedded",
            dataset_dir=dataset_dir,
            model_dir=os.path.join(model_dir, "run"),
            image_size=image_size,
            batch_size=batch_size,
            steps=steps + 1,  # the first step (tracing) is not timed
            max_eval_images=batch_size,
            checkpoint_every=10**9,
        )
        summary = Trainer(config, verbose=False).run()
    return summary["images_per_second"], summary["strategy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--json", default="", help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:  # torchvision (via timm) must load before TensorFlow in this stack
        import timm  # noqa: F401
        import torch  # noqa: F401

        have_timm = True
    except ImportError:
        have_timm = False
    import tensorflow as tf

    threads = os.cpu_count()
    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {threads} CPUs, "
        f"GPUs: {len(gpus)}; TensorFlow {tf.__version__}" + (f", PyTorch {torch.__version__}" if have_timm else "")
    )
    print(
        f"Training throughput at {args.image_size}x{args.image_size}, batch "
        f"{args.batch_size}, {args.steps} timed steps after warm-up\n"
    )
    rows = []
    print("| model | implementation | device | images/s |")
    print("|---|---|---|---|")
    for width in args.widths:
        rate, strategy = trainer_rate(width, args.batch_size, args.steps, args.image_size, args.dataset_dir)
        rows.append(dict(width=width, impl="keras_mobilevitv2 trainer", device=strategy, rate=rate))
        print(f"| MobileViTv2-{width} | keras_mobilevitv2 trainer | {strategy} | {rate:.1f} |", flush=True)
        if have_timm:
            rate, device = timm_training_rate(width, args.batch_size, args.steps, args.image_size, threads)
            rows.append(dict(width=width, impl="timm (PyTorch)", device=device, rate=rate))
            print(f"| MobileViTv2-{width} | timm (PyTorch) | {device} | {rate:.1f} |", flush=True)
    if not have_timm:
        print("\n(timm/PyTorch not installed: reference rows skipped)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
