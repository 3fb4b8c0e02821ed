"""A run interrupted mid-epoch and resumed ends with the weights of the run
that was never interrupted: data position, augmentation draws, optimizer
state, EMA and initial weights all come back."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from run_trainer import tiny_model_fn

from training import TrainConfig
from training import Trainer

HARNESS = os.path.join(os.path.dirname(__file__), "run_trainer.py")


class Interrupted(Exception):
    pass


def _noise_folder(root, classes=2, per_class=12, size=40):
    """Random images, so that every augmentation changes what is learnt."""
    rng = np.random.RandomState(0)
    for label in range(classes):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
            image[: size // 2] //= label + 1  # something to learn
            tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image))
    return root


def _config(model_dir, data, **overrides):
    # 24 images / batch 4: 6 steps an epoch; 14 steps cross two epoch ends.
    values = dict(
        model_dir=str(model_dir),
        data=str(data),
        image_size=32,
        batch_size=4,
        steps=14,
        lr=5e-3,
        min_lr=5e-4,
        warmup_steps=2,
        checkpoint_every=4,
        ema_decay=0.9,
        randaugment=True,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        random_erasing=0.25,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _all_weights(trainer):
    return [w.numpy() for w in trainer.model.weights] + list(trainer.ema_weights)


def _assert_same_weights(expected, actual):
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"weight {index}")


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory):
    return _noise_folder(tmp_path_factory.mktemp("noise"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, noise_data):
    """(losses, weights) of the uninterrupted run."""
    model_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(_config(model_dir, noise_data), verbose=False, model_fn=tiny_model_fn)
    trainer.run()
    return trainer.step_losses, _all_weights(trainer)


@pytest.mark.parametrize("interrupt_at", [4])  # mid-epoch 0; the resume crosses two epoch ends
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, noise_data, straight_run, monkeypatch, interrupt_at):
    straight_losses, expected = straight_run

    save = tf.train.CheckpointManager.save

    def save_then_die(manager, checkpoint_number=None, **kwargs):
        path = save(manager, checkpoint_number=checkpoint_number, **kwargs)
        if checkpoint_number == interrupt_at:
            raise Interrupted(path)  # the process dies right after this checkpoint
        return path

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_die)
    with pytest.raises(Interrupted):
        Trainer(_config(tmp_path / "resumed", noise_data), verbose=False, model_fn=tiny_model_fn).run()
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)

    resumed = Trainer(_config(tmp_path / "resumed", noise_data), verbose=False, model_fn=tiny_model_fn)
    summary = resumed.run()
    assert len(resumed.step_losses) == 14 - interrupt_at
    np.testing.assert_allclose(resumed.step_losses, straight_losses[interrupt_at:], rtol=1e-5)
    _assert_same_weights(expected, _all_weights(resumed))
    assert summary["final_step"] == 14


def test_reruns_with_the_same_seed_are_identical(tmp_path, noise_data):
    first = Trainer(_config(tmp_path / "a", noise_data, steps=3), verbose=False, model_fn=tiny_model_fn)
    first.run()
    second = Trainer(_config(tmp_path / "b", noise_data, steps=3), verbose=False, model_fn=tiny_model_fn)
    second.run()
    _assert_same_weights(_all_weights(first), _all_weights(second))


def _latest_checkpoint_step(model_dir):
    state = model_dir / "checkpoints" / "checkpoint"
    if not state.exists():
        return 0
    for line in state.read_text().splitlines():
        if line.startswith("model_checkpoint_path:"):
            return int(line.split("ckpt-")[-1].strip().strip('"'))
    return 0


def _harness(config, weights_path):
    return [
        sys.executable,
        HARNESS,
        "--tiny_model",
        "--config",
        json.dumps(config.__dict__),
        "--save_weights",
        str(weights_path),
    ]


def test_killed_process_resumes_to_the_same_weights(tmp_path, noise_data, straight_run):
    """The same with a real SIGKILL, at whatever point the process has reached."""
    config = _config(tmp_path / "killed", noise_data, checkpoint_every=2)
    process = subprocess.Popen(
        _harness(config, tmp_path / "unused.npz"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while _latest_checkpoint_step(tmp_path / "killed") < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = _latest_checkpoint_step(tmp_path / "killed")
    assert 2 <= saved_step < 14
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = subprocess.run(_harness(config, tmp_path / "resumed.npz"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = json.loads(resumed.stdout.strip().splitlines()[-1])["losses"]
    straight_losses, expected = straight_run
    np.testing.assert_allclose(losses, straight_losses[saved_step:], rtol=1e-5)  # nothing redone or lost
    actual = np.load(tmp_path / "resumed.npz")
    _assert_same_weights(expected, [actual[name] for name in actual.files])
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["final_step"] == 14


def test_a_checkpoint_missing_weights_is_refused_and_kept(tmp_path, noise_data, monkeypatch):
    """A checkpoint written before checkpoints listed every weight (here: the
    BN statistics held in a list, which TF's object graph does not reach)
    cannot continue its run: the resume says so and leaves it in place."""
    checkpoint_class = tf.train.Checkpoint

    def without_weights_list(**parts):
        parts.pop("weights", None)
        return checkpoint_class(**parts)

    config = _config(tmp_path / "legacy", noise_data, steps=4, checkpoint_every=2)
    monkeypatch.setattr(tf.train, "Checkpoint", without_weights_list)
    Trainer(config, verbose=False, model_fn=tiny_model_fn).run()
    monkeypatch.setattr(tf.train, "Checkpoint", checkpoint_class)
    saved = sorted(os.listdir(tmp_path / "legacy" / "checkpoints"))

    resume = Trainer(_config(tmp_path / "legacy", noise_data, steps=8), verbose=False, model_fn=tiny_model_fn)
    with pytest.raises(ValueError, match=r"written before checkpoints held every model weight: 2 of .*bn/moving_mean"):
        resume.run()
    assert sorted(os.listdir(tmp_path / "legacy" / "checkpoints")) == saved
