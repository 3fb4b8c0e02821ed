"""The QAT-fidelity study: its bar, its cells, its report, and a tiny run end to end."""

import json
import os

import pytest
from benchmark_runs import run_benchmark

from benchmarks import qat_fidelity


def _entry(dataset, size, width, recipe, float_top1, ptq, qat, chosen="fine-tuned"):
    cell = qat_fidelity.Cell(dataset, size, width, recipe)
    top1 = {"float_tflite": float_top1, "ptq_int8": ptq, "qat_int8": qat}
    epochs = [{"epoch": 1, "step": 10, "raw": qat, "ema": qat - 0.01}, {"epoch": 2, "step": 20, "raw": qat, "ema": qat}]
    selection = {
        "chosen": chosen,
        "metric": "top1",
        "start": {"top1": ptq},
        "fine_tuned_from": "epoch 2 (raw weights)",
        "epochs": epochs,
    }
    entry = dict(dataset=dataset, size=size, width=width, recipe=recipe, key=cell.key, top1=top1, selection=selection)
    entry["machine"] = "Test CPU @ 2 GHz"
    entry["config"] = {"float_lr": qat_fidelity.float_lr(width)}
    entry["command"] = f"python -m quantization.pipeline --output_dir={cell.key}"
    return dict(entry, meets=qat_fidelity.meets_the_bar(top1))


def test_the_bar_is_the_better_of_ptq_and_float_less_half_a_point():
    bar = qat_fidelity.meets_the_bar
    assert bar({"float_tflite": 0.95, "ptq_int8": 0.93, "qat_int8": 0.945})  # within 0.5 points of float
    assert not bar({"float_tflite": 0.95, "ptq_int8": 0.93, "qat_int8": 0.944})
    assert not bar({"float_tflite": 0.95, "ptq_int8": 0.96, "qat_int8": 0.955})  # below PTQ
    assert bar({"float_tflite": 0.95, "ptq_int8": 0.96, "qat_int8": 0.96})


def test_cells_run_cheapest_first_and_recipes_share_the_float_model(tmp_path):
    args = qat_fidelity.parse_args(["--widths", "2.0", "0.5", "--sizes", "48", "32", "--recipes", "folded",
                                    "batch_statistics"])  # fmt: skip
    cells = qat_fidelity.planned_cells(args)
    assert [(c.width, c.size) for c in cells][:4] == [(0.5, 32)] * 4  # 2 datasets x 2 recipes
    assert cells[0].float_key == cells[1].float_key and cells[0].key != cells[1].key
    folder = tmp_path / "data"
    for name in ("a", "b"):
        (folder / "train" / name).mkdir(parents=True)
        for i in range(40):
            (folder / "train" / name / f"{i}.png").write_bytes(b"")
    settings = qat_fidelity.Settings(batch_size=32)
    assert qat_fidelity.qat_bn_steps(cells[0], str(folder), settings) == 0  # folded
    assert qat_fidelity.qat_bn_steps(cells[1], str(folder), settings) == 3  # one epoch of 80 images
    with pytest.raises(SystemExit):
        qat_fidelity.parse_args(["--sizes", "16"])
    # Without --recipes: the package's recipe at each width.
    default = qat_fidelity.parse_args(["--widths", "0.5", "2.0", "--sizes", "32", "--datasets", "digits"])
    recipes = [cell.recipe for cell in qat_fidelity.planned_cells(default)]
    assert recipes == ["folded_lr_x5_warmup", "folded_lr_x5_warmup_distill_half"]


def test_a_recipe_run_later_fine_tunes_the_float_model_already_trained(tmp_path):
    trained = tmp_path / "runs" / "digits_32_w0.5_folded"
    (trained / "float").mkdir(parents=True)
    variant = tmp_path / "runs" / "digits_32_w0.5_folded_lr_x5"
    variant.mkdir(parents=True)
    (variant / "float").symlink_to(trained / "float")
    entries = [_entry("digits", 32, 0.5, recipe, 0.9, 0.9, 0.9) for recipe in ("folded_lr_x5", "folded")]
    results = {"cells": {e["key"]: e for e in entries}}
    assert qat_fidelity.trained_float_runs(str(tmp_path), results) == {"digits_32_w0.5": str(trained)}


def test_the_main_recipe_is_what_the_pipeline_does_by_default(tmp_path):
    # The README's table shows each width's main recipe as the package's recipe: its cells must run the
    # pipeline's defaults for that width.
    from quantization.pipeline_stages import PipelineConfig

    for width in (0.5, 1.0, 2.0):
        cell = qat_fidelity.Cell("digits", 32, width, qat_fidelity.main_recipe(width))
        arguments = qat_fidelity.pipeline_arguments(cell, "run", str(tmp_path), qat_fidelity.Settings())
        default = PipelineConfig(model=qat_fidelity.MODELS[width])
        assert f"--qat_lr={default.qat_lr:g}" in arguments and f"--qat_bn_steps={default.qat_bn_steps}" in arguments
        assert f"--float_lr={default.float_lr:g}" in arguments
        assert f"--qat_warmup_steps={default.qat_warmup_steps}" in arguments
        distillation = [argument for argument in arguments if argument.startswith("--qat_distillation=")]
        expected = [f"--qat_distillation={default.qat_distillation:g}"] if default.qat_distillation else []
        assert distillation == expected, width
    assert [qat_fidelity.main_recipe(width) for width in (0.5, 1.0, 2.0)] == [
        "folded_lr_x5_warmup",
        "folded_lr_x5_warmup",
        "folded_lr_x5_warmup_distill_half",
    ]


def test_report_tables_and_plot(tmp_path):
    results = {
        "settings": {"float_epochs": 10, "qat_epochs": 2, "qat_lr": 2e-5, "batch_size": 32, "calibration_images": 8},
        "cells": {
            e["key"]: e
            for e in (
                _entry("digits", 32, 0.5, "folded_lr_x5_warmup", 0.95, 0.94, 0.96),
                _entry("digits", 32, 0.5, "batch_statistics", 0.95, 0.94, 0.93, chosen="start"),
            )
        },
    }
    text = qat_fidelity.markdown(results)
    assert "Met in 1 of 1 cells" in text  # the package's recipe; the other is in the recipe table
    assert "- Trained on: Test CPU @ 2 GHz." in text  # a seeded float model is the same on one machine only
    assert "10 float epochs at peak lr 0.003 (width 0.5), 2 QAT epochs" in text
    assert (
        "| digits | 32 | 0.5 | folded_lr_x5_warmup | 95.0 | 94.0 | 96.0 | +2.0 | epoch 2 (raw weights) | yes |" in text
    )
    assert "| batch_statistics | 95.0 |" not in text
    # Each recipe's count of cells meeting the bar, and its mean gain over PTQ.
    assert "| folded_lr_x5_warmup | 0 | 1 | 1 | 96.0 | +2.0 |" in text
    assert "| batch_statistics | 0 | 1 | 0 | 93.0 | -1.0 |" in text
    # The recipes side by side: the best epoch (fake-quant Keras) and the exported int8, per recipe.
    assert "| digits | 32 | 0.5 | 94.0 | 93.0 (epoch 1 raw) / 93.0 | 96.0 (epoch 1 raw) / 96.0 |" in text
    pytest.importorskip("matplotlib")
    qat_fidelity.plot(results, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_study_runs_both_recipes_on_one_float_model(tmp_path):
    work, output = tmp_path / "work", tmp_path / "out"
    arguments = ["--tiny", "--widths", "0.5", "--datasets", "digits", "--sizes", "32"]
    arguments += ["--recipes", "folded", "batch_statistics", "--work_dir", work, "--output_dir", output]
    completed = run_benchmark("benchmarks.qat_fidelity", *arguments, timeout=1500)
    results = json.loads((output / "qat_fidelity.json").read_text())
    folded, batch = (results["cells"][f"digits_32_w0.5_{recipe}"] for recipe in ("folded", "batch_statistics"))
    assert folded["top1"]["float_tflite"] == batch["top1"]["float_tflite"]  # the same float model
    assert folded["top1"]["float_tflite"] > 0.3  # trained: the int8 audits compare real predictions, not ties
    assert os.path.islink(work / "runs" / batch["key"] / "float") and "--stages=qat,report" in batch["command"]
    assert batch["config"]["qat_bn_steps"] == 45 and folded["config"]["qat_bn_steps"] == 0  # 1,438 images, batch 32
    assert folded["evaluation_images"] == 359 and len(folded["selection"]["epochs"]) == 1
    assert (output / "qat_fidelity.png").exists() and "digits_32_w0.5_folded: float" in completed.stderr


def test_width_2_trains_and_fine_tunes_at_rates_that_do_not_collapse():
    settings = qat_fidelity.Settings()
    flags = {
        width: qat_fidelity.pipeline_arguments(
            qat_fidelity.Cell("digits", 32, width, qat_fidelity.main_recipe(width)), "run", "data", settings
        )
        for width in (0.5, 1.0, 2.0)
    }
    assert "--float_lr=0.003" in flags[0.5] and "--float_lr=0.003" in flags[1.0]
    assert "--float_lr=0.001" in flags[2.0]  # 3e-3 collapsed to chance: results/qat_fidelity_float_lr.md
    # and fine-tunes it at the same fraction of that rate as the narrower models (1/30)
    assert "--qat_lr=0.0001" in flags[0.5] and "--qat_lr=3.33333e-05" in flags[2.0]
