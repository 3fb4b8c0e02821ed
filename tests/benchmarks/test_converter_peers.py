"""The converters section's judging and bookkeeping, offline and fast.

No virtual environment is created and nothing is installed: the structure
and agreement checks run on small TFLite models converted here with the
package's converter (one of them deliberately all-zero), and the
environment and worker failure paths use stand-ins.
"""

import os
import sys

import keras
import numpy as np
import pytest

# `benchmarks` is imported from the repository (see test_benchmark_helpers.py).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks import converter_peers  # noqa: E402
from benchmarks.isolation import WorkerError  # noqa: E402
from benchmarks.settings import Settings  # noqa: E402

SIZE = 8
SETTINGS = Settings(widths=(0.5,), batch_sizes=(1,), image_size=SIZE)


def classifier(seed, zero=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    if zero:  # converts and runs fine, and outputs nothing but zeros
        model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    return model


def tflite(model):
    from quantization.tflite_export import convert

    return convert(model, "float32", io_type="float32")


@pytest.fixture(scope="module")
def samples_nchw():
    return np.random.default_rng(0).uniform(-2, 2, (6, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(samples_nchw):
    """A "timm" stand-in: a model's logits on the NHWC view of the samples."""
    model = classifier(seed=1)
    return model, model.predict_on_batch(samples_nchw.transpose(0, 2, 3, 1))


def test_agreement_verdicts():
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(8, 10))
    assert converter_peers.agreement(expected + 1e-6, expected)["verdict"] is None
    assert converter_peers.agreement(np.zeros_like(expected), expected)["verdict"] == "all-zero outputs"
    assert converter_peers.agreement(np.full_like(expected, 3.0), expected)["verdict"] == "constant outputs"
    assert converter_peers.agreement(expected * np.nan, expected)["verdict"] == "non-finite outputs"
    # Each sample's logits shuffled: far off, and top-1 mostly lost.
    shuffled = np.stack([row[rng.permutation(10)] for row in expected])
    assert converter_peers.agreement(shuffled, expected)["verdict"] == "disagrees with timm"
    assert "output shape" in converter_peers.agreement(expected[:, :5], expected)["verdict"]


def test_check_model_agrees_with_its_source(reference, samples_nchw):
    model, expected = reference
    structure, agreement = converter_peers.check_model(tflite(model), samples_nchw, expected)
    assert agreement["verdict"] is None
    assert agreement["top1_agreement"] == 1.0
    assert agreement["relative_max_error"] < 1e-4
    assert structure["input_shape"] == [1, SIZE, SIZE, 3]
    assert structure["ops"] >= 3 and structure["custom_ops"] == []
    assert structure["float_tensors_inside"] > 0  # a float model: weights and activations
    assert structure["max_rank"] == 4


def test_all_zero_model_is_reported_wrong_not_timed(reference, samples_nchw, tmp_path):
    _, expected = reference
    path = tmp_path / "zero.tflite"
    path.write_bytes(tflite(classifier(seed=2, zero=True)))
    row = converter_peers.make_row("onnx2tf", "onnx2tf", "stock", "int8", 0.5, 1, path=str(path))
    converter_peers.judge_peer_rows([row], lambda row: in_process_judge(row, samples_nchw, expected))
    assert row["status"] == "wrong" and row["reason"] == "all-zero outputs"
    assert row["agreement"]["all_zero"]
    converter_peers.time_rows([row], SETTINGS)  # only pending rows are timed
    assert row["timing"] is None
    text = converter_peers.section_text({"rows": [row], "versions": {}, "envs_dir": "envs"})
    assert "wrong (all-zero outputs)" in text


def in_process_judge(row, samples_nchw, expected):
    with open(row["path"], "rb") as f:
        return converter_peers.check_model(f.read(), samples_nchw, expected)


def test_refused_model_is_not_available_in_a_worker(samples_nchw, tmp_path):
    # The worker the benchmark uses (a model may abort LiteRT): inputs and
    # timm's logits as converter_peers.measure leaves them in the work dir.
    np.savez(tmp_path / "inputs.npz", samples=samples_nchw)
    np.save(tmp_path / "reference_w0.5.npy", np.zeros((len(samples_nchw), 5)))
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"not a flatbuffer")
    row = converter_peers.make_row("litert_torch", "litert-torch", "stock", "int8", 0.5, 1, path=str(path))
    converter_peers.judge_peer_rows([row], lambda row: converter_peers.judge_in_worker(row, str(tmp_path)))
    assert row["status"] == "n/a" and row["reason"].startswith("LiteRT refuses the model")


def _lost_mean_model():
    """A float model whose SUB reads one tensor twice: a norm whose mean a
    converter dropped (x - x where x - mean belongs)."""
    from quantization.tflite_graph import load_object_model
    from quantization.tflite_graph import pack_object_model
    from quantization.tflite_graph import read_graph

    inputs = keras.Input((SIZE, SIZE, 3), batch_size=1)
    x = keras.layers.Conv2D(8, 1)(inputs)
    centred = keras.layers.Subtract()([x, keras.layers.Conv2D(8, 1)(x)])
    model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(centred)))
    flatbuffer = tflite(model)
    index = next(op.index for op in read_graph(flatbuffer).operators if op.name == "SUB")
    schema_model = load_object_model(flatbuffer)
    operator = schema_model.subgraphs[0].operators[index]
    operator.inputs = [operator.inputs[0], operator.inputs[0]]
    return flatbuffer, pack_object_model(schema_model)


def test_a_model_that_subtracts_a_tensor_from_itself_says_so(tmp_path):
    intact, lost_mean = _lost_mean_model()
    assert converter_peers.structure_summary(intact)["self_differences"] == 0
    assert converter_peers.structure_summary(lost_mean)["self_differences"] == 1
    path = tmp_path / "lost_mean.tflite"
    path.write_bytes(lost_mean)
    row = converter_peers.make_row("onnx2tf", "onnx2tf", "stock", "int8", 0.5, 1, path=str(path))

    def crashing_judge(row):
        raise WorkerError("worker killed by signal 6")

    converter_peers.judge_peer_rows([row], crashing_judge)
    assert row["status"] == "n/a"
    assert row["reason"] == (
        "LiteRT crashes on the model (worker killed by signal 6); 1 SUB/SQUARED_DIFFERENCE ops subtract a tensor "
        "from itself (always 0: x - x where x - mean belongs)"
    )


def test_judge_worker_agrees_in_process(reference, samples_nchw, tmp_path):
    model, expected = reference
    np.savez(tmp_path / "inputs.npz", samples=samples_nchw)
    np.save(tmp_path / "reference_w0.5.npy", expected)
    path = tmp_path / "good.tflite"
    path.write_bytes(tflite(model))
    row = converter_peers.make_row("onnx2tf", "onnx2tf", "stock", "float32", 0.5, 1, path=str(path))
    structure, agreement = converter_peers.judge_in_worker(row, str(tmp_path))
    assert agreement["verdict"] is None and agreement["top1_agreement"] == 1.0
    assert structure["input_shape"] == [1, SIZE, SIZE, 3]


def test_channels_first_layout():
    images = np.zeros((2, 3, 16, 16), np.float32)
    assert converter_peers.in_layout(images, [2, 3, 16, 16]).shape == (2, 3, 16, 16)
    assert converter_peers.in_layout(images, [2, 16, 16, 3]).shape == (2, 16, 16, 3)


def test_env_is_ready_only_with_the_same_pins(tmp_path):
    peer = converter_peers.Peer("fake", "fake converter", ("a==1", "b==2"))
    envs = str(tmp_path)
    assert converter_peers.env_python(envs, peer) == os.path.join(envs, "fake", "bin", "python")
    assert not converter_peers.env_is_ready(envs, peer)
    os.makedirs(os.path.join(envs, "fake", "bin"))
    open(converter_peers.env_python(envs, peer), "w").close()
    marker = os.path.join(envs, "fake", converter_peers.READY_FILE)
    with open(marker, "w") as f:
        f.write("a==1\nb==1\n")  # installed with other pins: recreated
    assert not converter_peers.env_is_ready(envs, peer)
    with open(marker, "w") as f:
        f.write(converter_peers.requirements_text(peer))
    assert converter_peers.env_is_ready(envs, peer)
    assert converter_peers.ensure_env(envs, peer, python="/nonexistent") == converter_peers.env_python(envs, peer)


def test_every_peer_pins_its_converter_and_torch():
    for peer in converter_peers.PEERS:
        names = [requirement.split("==")[0] for requirement in peer.requirements]
        assert all("==" in requirement for requirement in peer.requirements)
        assert {"torch", "timm"} <= set(names)


def test_uninstallable_env_makes_every_attempt_not_available(tmp_path):
    peer = converter_peers.Peer("fake", "fake converter", ("a==1",))
    entries, versions = converter_peers.peer_entries(peer, SETTINGS, str(tmp_path), str(tmp_path), python_for_test())
    assert len(entries) == 4  # stock and patched, float32 and int8
    assert all(entry["status"] == "n/a" for entry in entries)
    assert all(entry["reason"].startswith("environment not installable") for entry in entries)
    assert versions == {}


def python_for_test():
    """An `ensure` that fails as creating an environment with no Python would."""

    def ensure(envs_dir, peer):
        return converter_peers.ensure_env(envs_dir, peer, python="false")

    return ensure


def test_worker_failures_become_reasons(tmp_path):
    peer = converter_peers.Peer("fake", "fake converter", ("a==1",))

    def ready(envs_dir, peer):
        return sys.executable

    def crashing(python, task, work_dir, settings):
        raise WorkerError("RuntimeError: converter exploded")

    entries, _ = converter_peers.peer_entries(peer, SETTINGS, "", "", ensure=ready, run=crashing)
    assert {entry["reason"] for entry in entries} == {"WorkerError: RuntimeError: converter exploded"}

    def dies_part_way(python, task, work_dir, settings):
        first = {"width": 0.5, "batch": 1, "form": "stock", "precision": "float32", "status": "n/a", "reason": "x"}
        return {"entries": [first], "versions": {"torch": "9"}, "died": "worker killed by signal 11"}

    entries, versions = converter_peers.peer_entries(peer, SETTINGS, "", "", ensure=ready, run=dies_part_way)
    assert entries[0]["reason"] == "x"
    assert all("worker killed by signal 11" in entry["reason"] for entry in entries[1:])
    assert versions == {"torch": "9"}


def test_run_worker_without_inputs_raises(tmp_path):
    # The real worker, in this environment: it fails before writing its JSON.
    with pytest.raises(WorkerError):
        converter_peers.run_worker(sys.executable, "litert_torch", str(tmp_path), SETTINGS)


def test_ratio_compares_matching_precision():
    ours = converter_peers.make_row("keras_mobilevitv2", "ours", "-", "int8", 0.5, 1, status="ok")
    ours["timing"] = {"median_ms": 2.0}
    peer = converter_peers.make_row("litert_torch", "litert-torch", "patched", "int8", 0.5, 1, status="ok")
    peer["timing"] = {"median_ms": 4.0}
    peer_float = converter_peers.make_row("litert_torch", "litert-torch", "patched", "float32", 0.5, 1, status="ok")
    peer_float["timing"] = {"median_ms": 4.0}
    rows = [ours, peer, peer_float]
    assert converter_peers.table_row(rows, peer)[6] == "0.50x"
    assert converter_peers.table_row(rows, peer_float)[6] == "-"  # no float row of ours


def test_run_renders_the_section_and_keeps_it_opt_in():
    from benchmarks import run

    settings, _ = run.parse_settings(["--sections", "converters", "--peer_envs_dir", "/envs"])
    assert settings.sections == ("converters",) and settings.peer_envs_dir == "/envs"
    assert "converters" not in run.parse_settings([])[0].sections  # creates GiBs of environments
    assert run.section_text("converters", {"error": "boom"}, {}).endswith("n/a (boom)")
    row = converter_peers.make_row("litert_torch", "litert-torch", "stock", "float32", 0.5, 1, status="n/a", reason="x")
    text = run.section_text("converters", {"rows": [row], "versions": {}, "envs_dir": "/envs"}, {})
    assert converter_peers.TITLE in text and "n/a (x)" in text


def test_peer_reuse_keeps_an_earlier_runs_conversions_and_says_so(monkeypatch, tmp_path):
    from benchmarks import run

    with pytest.raises(SystemExit):  # nothing to reuse without the earlier run's directory
        run.parse_settings(["--sections", "converters", "--peer_reuse"])
    settings, _ = run.parse_settings(["--peer_reuse", "--peer_work_dir", str(tmp_path)])
    assert settings.peer_reuse and not run.parse_settings([])[0].peer_reuse
    calls = []
    monkeypatch.setattr(converter_peers, "measure", lambda *args, reuse: calls.append(reuse) or ([], {}))
    section = converter_peers.run_section(settings)
    assert calls == [True] and section["reused_conversions_from"] == str(tmp_path)
    assert f"an earlier run's, kept in `{tmp_path}`" in converter_peers.section_text(section)
    fresh = converter_peers.run_section(Settings(peer_work_dir=str(tmp_path)))
    assert calls == [True, False] and "reused_conversions_from" not in fresh
    assert "earlier run" not in converter_peers.section_text(fresh)
