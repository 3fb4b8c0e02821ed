"""The trainer's numerical properties, checked by comparing runs.

- two workers (MultiWorkerMirroredStrategy, separate processes) with global
  batch B end with the weights of one device with batch B, BatchNorm
  statistics included (synchronized BN);
- k accumulated micro-batches of b make the same optimizer step as one
  batch of k*b;
- mixed_float16 / mixed_bfloat16 logits stay within measured bounds of
  float32, so do the gradients of mixed-precision training, and
  mixed_float16 training scales the loss: an overflowing gradient is
  skipped and lowers the loss scale.

Runs use a tiny MobileViTv2-like model (equivalence_worker.tiny_model) at
32x32 on 64 noise images; timings on 2 shared CPU cores: 10-70 s per test.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from training import TrainConfig
from training import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "equivalence_worker.py")
sys.path.insert(0, HERE)

import equivalence_worker  # noqa: E402
from run_trainer import free_ports  # noqa: E402


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """64 train / 16 val random-noise PNGs in 4 classes (40x40)."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("noise_images")
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 16), ("val", 4)):
        for label in range(4):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.randint(0, 256, (40, 40, 3)).astype(np.uint8)
                image[..., label % 3] //= 2  # a weak class signal
                tf.io.write_file(str(folder / f"{i:03d}.png"), tf.io.encode_png(image))
    return str(root)


def deterministic_config(model_dir, data, **overrides):
    """Every augmentation either off or seeded per image (crop, flip, erasing);
    mixup/cutmix off (they mix each image with a neighbour of its own
    per-replica batch, which differs with the number of replicas)."""
    values = dict(
        data=data,
        model_dir=str(model_dir),
        strategy="one_device",
        image_size=32,
        batch_size=8,
        steps=3,
        lr=5e-3,
        min_lr=5e-4,
        warmup_steps=1,
        weight_decay=0.05,
        ema_decay=0.5,  # so that the EMA is worth comparing after 3 steps
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.5,
        max_eval_images=8,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_in_process(config, kind="tiny"):
    trainer = Trainer(config, verbose=False, model_fn=equivalence_worker.model_fn(kind))
    trainer.run()
    return trainer


# Tolerances of the run comparisons (measured values in the tests' docstrings).
MOMENT_RTOL = 2e-4  # Adam moments: max |a - b| / max |a| per tensor
WEIGHT_ATOL = 1e-4  # weights and EMA where the gradient is not ~0
SIGNAL = 1e-3  # "not ~0": |first moment| >= SIGNAL * the tensor's scale
FLOOR = 1e-3  # a tensor's scale: its largest |moment|, at least FLOOR * the model's
MOVING_MEAN_RTOL = 2e-2  # BatchNorm moving means, relative to their largest


def compare_runs(reference, other, lr, steps):
    """Asserts that two `equivalence_worker.run_state` results are the same
    training up to float summation order; returns the largest errors.

    Adam's moments are linear / quadratic in the gradients: they are compared
    tightly and catch any scale error (which Adam's update itself hides).
    The weights are compared tightly wherever the gradient is real. Where it is
    ~0 (e.g. the query bias of the separable attention, whose gradient is 0 in
    exact arithmetic: a constant added to all scores cancels in the softmax),
    Adam's step m / sqrt(v) is rounding noise divided by rounding noise, of
    any sign and up to lr per step: those components get 2 * lr * steps. A
    whole tensor can be such noise (the beta of a norm followed by a 1x1 conv
    and a training-mode BatchNorm, which removes constants): a tensor whose
    largest moment is below FLOOR times the model's largest must be below it
    in both runs; others are compared relative to their largest moment
    (measured: real tensors >= 1.5e-2 of the model's largest, noise-only
    ones ~4e-7).
    """
    np.testing.assert_allclose(other["losses"], reference["losses"], rtol=1e-5)
    worst = {"moments": 0.0, "weights": 0.0, "noise_driven": 0.0, "moving_mean": 0.0, "moving_variance": 0.0}
    names = list(reference["names"])
    count = sum(1 for key in reference.files if key.startswith("w"))
    assert count and count == sum(1 for key in other.files if key.startswith("w"))
    largest = {
        kind: max(float(np.max(np.abs(reference[key]))) for key in reference.files if key.startswith(kind))
        for kind in ("m", "v")
    }
    floor = {"m": FLOOR * largest["m"], "v": FLOOR**2 * largest["v"]}  # v is quadratic
    for i in range(count):
        if f"m{i}" in reference:
            for kind in ("m", "v"):
                expected, got = reference[f"{kind}{i}"], other[f"{kind}{i}"]
                scale = float(np.max(np.abs(expected)))
                if scale < floor[kind]:  # a noise-only tensor: noise in both runs
                    assert float(np.max(np.abs(got))) < floor[kind], (f"{kind}{i}", scale)
                    continue
                error = float(np.max(np.abs(expected - got)) / scale)
                assert error < MOMENT_RTOL, (f"{kind}{i}", error)
                worst["moments"] = max(worst["moments"], error)
            moment = np.abs(reference[f"m{i}"])
            signal = moment >= SIGNAL * max(float(np.max(moment)), floor["m"])
            for key in (f"w{i}", f"ema{i}"):
                difference = np.abs(reference[key] - other[key])
                real = float(np.max(difference[signal], initial=0.0))
                noise = float(np.max(difference[~signal], initial=0.0))
                assert real < WEIGHT_ATOL, (key, real)
                assert noise <= 2 * lr * steps, (key, noise)
                worst["weights"] = max(worst["weights"], real)
                worst["noise_driven"] = max(worst["noise_driven"], noise)
        else:  # BatchNorm moving statistics (and their EMA)
            # A moving mean follows its input's mean, which a noise-driven bias
            # before the BN shifts (the BN output does not see it); a moving
            # variance is blind to shifts and is held to the moments' bound.
            bound = MOVING_MEAN_RTOL if names[i].endswith("moving_mean") else MOMENT_RTOL
            for key in (f"w{i}", f"ema{i}"):
                expected = reference[key]
                error = float(np.max(np.abs(expected - other[key])) / max(np.max(np.abs(expected)), 1e-30))
                assert error < bound, (names[i], key, error)
                kind = "moving_mean" if names[i].endswith("moving_mean") else "moving_variance"
                worst[kind] = max(worst[kind], error)
    print("largest differences:", worst)
    return worst


class _State(dict):
    """`run_state` in memory, with the `files` attribute of a loaded npz."""

    @property
    def files(self):
        return list(self)


def state_of(trainer):
    return _State(equivalence_worker.run_state(trainer))


# ---------------------------------------------------------------- workers


def test_two_workers_match_one_device_with_the_same_global_batch(tmp_path, image_folder):
    """Global batch 8 = 2 workers x 4 vs one device x 8, 3 steps: the same
    losses, Adam moments, weights, EMA and BatchNorm moving statistics.

    The global batch is the same set of images: every pipeline shuffles the
    epoch with the same seed and worker s of n takes images s, s + n, ...;
    each image's crop / flip / erasing is seeded by its position in that
    global order (not by the worker), so it is the same image in both runs.
    Synchronized BatchNorm makes the batch statistics those of all 8.
    Measured (largest over both workers): moments 2.5e-5 relative, weights
    1.1e-6, moving variance 1.8e-7 relative, moving mean 8.8e-4 relative
    (see `compare_runs` for the noise-driven components).
    """
    one = deterministic_config(tmp_path / "one", image_folder)
    reference = state_of(run_in_process(one))
    moving = [i for i, w in enumerate(equivalence_worker.tiny_model(32, 4).weights) if "moving" in w.path]
    initial = equivalence_worker.tiny_model(32, 4).get_weights()
    assert moving and all(not np.allclose(reference[f"w{i}"], initial[i]) for i in moving)

    config = deterministic_config(tmp_path / "two", image_folder, strategy="multi_worker")
    for state in run_two_workers(config, "tiny", tmp_path):
        compare_runs(reference, state, one.lr, one.steps)


@pytest.mark.parametrize("kind", ["tiny_qat", "tiny_qat_distill"])
def test_two_workers_train_the_qat_model_of_one_device(tmp_path, image_folder, kind):
    """QAT, 2 workers x 4 vs one device x 8, 3 steps: the same losses,
    weights and activation ranges. Each quantizer's range follows the min
    and max of the global batch (gathered across replicas), not the mean of
    the replicas' own, so the int8 model is that of one device. Also with
    the pipeline's distillation (each replica's teacher outputs for its share)."""
    one = deterministic_config(tmp_path / "one", image_folder)
    reference = state_of(run_in_process(one, kind))
    names = list(reference["names"])
    ranges = [i for i, name in enumerate(names) if name.endswith(("range_min", "range_max"))]
    calibrated = equivalence_worker.tiny_qat_model(32, 4).get_weights()
    assert ranges and any(not np.allclose(reference[f"w{i}"], calibrated[i], rtol=1e-3) for i in ranges)

    config = deterministic_config(tmp_path / "two", image_folder, strategy="multi_worker")
    for state in run_two_workers(config, kind, tmp_path):
        compare_runs(reference, state, one.lr, one.steps)


def run_two_workers(config, kind, tmp_path):
    """Runs `config` (strategy multi_worker) as two worker processes on
    localhost; returns each worker's `run_state`."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        save = str(tmp_path / f"{kind}_worker{index}.npz")
        command = [sys.executable, WORKER, "--config", json.dumps(config.__dict__), "--model", kind, "--save", save]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for process in processes:  # a worker left waiting for a dead peer
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return [np.load(tmp_path / f"{kind}_worker{index}.npz") for index in range(2)]


# ------------------------------------------------------ gradient accumulation


def test_accumulated_micro_batches_make_the_step_of_the_whole_batch(tmp_path, image_folder):
    """2 x 4 images accumulated = one batch of 8, over 2 optimizer steps.

    Exact only where each example's loss depends on that example alone:
    BatchNorm is frozen (inference mode, moving statistics), as per-micro-batch
    statistics differ from whole-batch ones; the layer norms of the attention
    blocks are per example; no dropout, no mixup/cutmix (per batch).
    """
    whole = deterministic_config(tmp_path / "whole", image_folder, steps=2, batch_size=8)
    reference = state_of(run_in_process(whole, "tiny_frozen_bn"))
    accumulated = state_of(
        run_in_process(
            deterministic_config(tmp_path / "accum", image_folder, steps=2, batch_size=4, grad_accum_steps=2),
            "tiny_frozen_bn",
        )
    )
    initial = equivalence_worker.tiny_model(32, 4).get_weights()
    assert max(float(np.max(np.abs(reference[f"w{i}"] - w))) for i, w in enumerate(initial)) > 1e-3
    compare_runs(reference, accumulated, whole.lr, whole.steps)


# --------------------------------------------------------- mixed precision


def _logits(build, weights, policy, images):
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build()
        model.set_weights(weights)
        return np.asarray(model.predict_on_batch(images), np.float64)
    finally:
        keras.mixed_precision.set_global_policy(previous)


# Bounds on max |logit - float32 logit| / max |float32 logit|, 8 random images.
# Measured (CPU, TF 2.21): tiny 32 px: fp16 1.2e-3, bf16 1.5e-2; tiny 64 px:
# fp16 1.1e-3, bf16 1.5e-2; MobileViTv2-0.5 64 px: fp16 2.2e-3, bf16 2.1e-2;
# 128 px: fp16 1.8e-3, bf16 1.2e-2. Bounds: ~4x (fp16) and ~3x (bf16) the
# largest measurement. bfloat16 keeps 8 mantissa bits to float16's 11.
MIXED_PRECISION_BOUNDS = {"mixed_float16": 1e-2, "mixed_bfloat16": 6e-2}


@pytest.mark.parametrize("network", ["tiny", "mobilevitv2_050"])
def test_mixed_precision_logits_are_close_to_float32(network):
    from conftest import randomize_keras_model

    from keras_mobilevitv2.mobilevitv2 import MobileViTv2

    if network == "tiny":
        size = 32

        def build():
            return equivalence_worker.tiny_model(size, 10)

    else:
        size = 64

        def build():
            return MobileViTv2(0.5, weights=None, input_shape=(size, size, 3), classes=1000, classifier_activation=None)

    reference = build()
    if network != "tiny":
        randomize_keras_model(reference, seed=0)  # O(1) activations everywhere
    weights = reference.get_weights()
    images = np.random.RandomState(0).uniform(0, 255, (8, size, size, 3)).astype("float32")
    expected = _logits(build, weights, "float32", images)
    scale = np.max(np.abs(expected))
    assert scale > 0.5
    for policy, bound in MIXED_PRECISION_BOUNDS.items():
        got = _logits(build, weights, policy, images)
        error = float(np.max(np.abs(got - expected)) / scale)
        assert error < bound, (network, policy, error)
        assert error > 0  # the policy really computed in half precision
        # The same class wherever float32's top-2 margin exceeds twice the
        # bound: closer calls may flip on another CPU without any bug.
        top2 = np.sort(expected, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * bound * scale
        np.testing.assert_array_equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_mixed_float16_training_scales_the_loss_and_skips_overflowing_steps(tmp_path, image_folder):
    """The trainer's optimizer is a LossScaleOptimizer. Finite gradients: the
    step is applied, the scale stays 2**15 and Adam sees the unscaled
    gradients. A gradient that overflows float16 (a layer multiplying its
    backward pass by 1e8): each step is skipped (weights untouched, no
    optimizer iteration) and halves the scale. mixed_bfloat16: plain AdamW,
    gradients within bounds of float32."""
    import tensorflow as tf

    config = dict(steps=2, mixed_precision="mixed_float16", max_eval_images=8)
    normal = run_in_process(deterministic_config(tmp_path / "normal", image_folder, **config), "tiny")
    assert isinstance(normal.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(normal.optimizer.dynamic_scale) == 2.0**15
    assert int(normal.optimizer.iterations) == 2
    # The gradients reach Adam unscaled: its moments (linear / quadratic in the
    # gradient) match a float32 run's to float16 accuracy after 2 steps
    # (measured 2.4e-2, bound 0.15; a loss scale left in or divided out twice
    # is off by a factor 2**15).
    float32 = state_of(
        run_in_process(
            deterministic_config(tmp_path / "float32", image_folder, **dict(config, mixed_precision="float32")), "tiny"
        )
    )
    # bfloat16 (no loss scaling; measured 4.7e-2) likewise.
    bfloat16 = run_in_process(
        deterministic_config(tmp_path / "bfloat16", image_folder, **dict(config, mixed_precision="mixed_bfloat16")),
        "tiny",
    )
    assert isinstance(bfloat16.optimizer, keras.optimizers.AdamW)
    assert keras.mixed_precision.global_policy().name == "float32"  # the trainer restores the policy
    moments = [k for k in float32.files if k[0] in "mv" and k[1:].isdigit()]
    largest = {kind: max(float(np.max(np.abs(float32[k]))) for k in moments if k[0] == kind) for kind in "mv"}
    for policy, run, bound in (("mixed_float16", normal, 0.15), ("mixed_bfloat16", bfloat16, 0.25)):
        half = state_of(run)
        worst = {"m": 0.0, "v": 0.0}
        for key in moments:
            scale = float(np.max(np.abs(float32[key])))
            if scale >= (FLOOR if key[0] == "m" else FLOOR**2) * largest[key[0]]:  # not a noise-only tensor
                error = float(np.max(np.abs(half[key] - float32[key])) / scale)
                assert error < bound, (policy, key, error)
                worst[key[0]] = max(worst[key[0]], error)
        print(policy, "vs float32 Adam moments, largest relative difference:", worst)
    initial = equivalence_worker.tiny_model(32, 4).get_weights()
    trainable = {id(v) for v in normal.model.trainable_variables}
    changed = [
        float(np.max(np.abs(w.numpy() - start)))
        for w, start in zip(normal.model.weights, initial)
        if id(w) in trainable
    ]
    assert min(changed) > 0 and all(np.isfinite(normal.step_losses))

    overflow = run_in_process(deterministic_config(tmp_path / "overflow", image_folder, **config), "tiny_blow_up")
    assert isinstance(overflow.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(overflow.optimizer.dynamic_scale) == 2.0**13  # halved at each of the 2 steps
    assert int(overflow.optimizer.iterations) == 0
    assert all(np.isfinite(overflow.step_losses))  # the loss itself was finite
    blow_up_initial = equivalence_worker.tiny_model(32, 4, blow_up=True).get_weights()
    for weight, start in zip(overflow.model.weights, blow_up_initial):
        if any(weight is v for v in overflow.model.trainable_variables):
            np.testing.assert_array_equal(weight.numpy(), start, err_msg=weight.path)
    assert tf.reduce_all([tf.reduce_all(tf.math.is_finite(w)) for w in overflow.model.trainable_variables])
