"""QAT int8 against post-training int8 and float, per width, dataset and input size.

    python -m benchmarks.qat_fidelity [--widths 0.5 1.0 2.0] [--datasets digits photos] [--sizes 32 48]
        [--recipes folded] [--work_dir runs/qat_fidelity] [--output_dir benchmarks/results]
        [--float_epochs 10] [--qat_epochs 2] [--qat_lr 2e-5] [--tiny]

Every cell runs the main job, `python -m quantization.pipeline
--stages=train,qat,export,report` (its log in WORK_DIR/runs/<cell>/pipeline.log),
on a real dataset built offline at the cell's size:
  digits - scikit-learn's 1,797 handwritten digits (`training.prepare_digits`);
  photos - patches of 12 photographs bundled with scikit-image, validation
           patches from a part of each photograph training never sees
           (`training.prepare_photos`).
Recipes are QAT variants, each fine-tuning the same trained float model:
  folded           - BatchNorm folded with frozen statistics from the first step;
  batch_statistics - the first QAT epoch normalizes by batch statistics
                     (updating the moving ones), then they freeze
                     (`quantize_model(batch_statistics_steps=...)`);
  folded_lr_x5     - folded, at 5x the QAT learning rate;
  folded_lr_x5_warmup - folded_lr_x5 with a 50-step learning-rate warm-up
                     (about the first QAT epoch here): the pipeline's
                     defaults (the package's recipe).
The figures (top-1 on the whole validation split of float TFLite, PTQ int8,
QAT int8, and the safeguard's choice and per-epoch top-1) are merged into
OUTPUT_DIR/qat_fidelity.json by cell, so runs of a few cells add up; the
tables go to qat_fidelity.md and the per-epoch plot to qat_fidelity.png.
Finished cells are reused unless --rerun.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from benchmarks.console import log
from benchmarks.isolation import REPOSITORY_ROOT
from benchmarks.isolation import cpu_name
from benchmarks.isolation import worker_environment

RESULT_NAME = "qat_fidelity"
MODELS = {0.5: "mobilevitv2_050", 0.75: "mobilevitv2_075", 1.0: "mobilevitv2_100", 1.25: "mobilevitv2_125",
          1.5: "mobilevitv2_150", 1.75: "mobilevitv2_175", 2.0: "mobilevitv2_200"}  # fmt: skip
DATASETS = ("digits", "photos")


@dataclasses.dataclass(frozen=True)
class Recipe:
    batch_statistics: bool  # BatchNorm statistics during the first QAT epoch
    lr_factor: float  # QAT learning rate / --qat_lr
    warmup_steps: int = 0
    distillation: float = 0.0  # the float model's share of the QAT targets (--qat_distillation)


RECIPES = {
    "folded": Recipe(False, 1.0),
    "batch_statistics": Recipe(True, 1.0),
    "folded_lr_x5": Recipe(False, 5.0),
    "folded_lr_x5_warmup": Recipe(False, 5.0, warmup_steps=50),
    "folded_lr_x5_warmup_distill": Recipe(False, 5.0, warmup_steps=50, distillation=1.0),
    "folded_lr_x5_warmup_distill_half": Recipe(False, 5.0, warmup_steps=50, distillation=0.5),
}
# Pipeline flags added after some committed runs, and the value those runs had.
OLDER_RUNS = {"qat_warmup_steps": "0"}
# The pipeline's defaults (--qat_lr 1e-4 at width 0.5, --qat_warmup_steps 50),
# whose --qat_distillation follows the width: `main_recipe`.
PACKAGE_RECIPES = ("folded_lr_x5_warmup", "folded_lr_x5_warmup_distill_half")


def main_recipe(width):
    """The recipe the pipeline runs by default at `width` (the main table's)."""
    from quantization.pipeline_stages import qat_distillation_for

    distillation = qat_distillation_for(MODELS[width])
    return next(name for name in PACKAGE_RECIPES if RECIPES[name].distillation == distillation)


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str
    size: int
    width: float
    recipe: str = "folded"

    @property
    def key(self):
        return f"{self.dataset}_{self.size}_w{self.width:g}_{self.recipe}"

    @property
    def float_key(self):
        """The cells of one (dataset, size, width) share their float model."""
        return f"{self.dataset}_{self.size}_w{self.width:g}"


@dataclasses.dataclass(frozen=True)
class Settings:
    float_epochs: int = 10
    qat_epochs: int = 2
    qat_lr: float = 2e-5
    batch_size: int = 32
    calibration_images: int = 128
    train_per_class: int = 150  # photos only; the digits are all used
    val_per_class: int = 50


# Three float epochs: after one (still in warm-up) the model was random, and int8 rounding flipped its near-tied
# top-1 on the export audit's sample images (agreement 0.75 < 0.80), so the PTQ export was refused.
TINY = Settings(float_epochs=3, qat_epochs=1, calibration_images=8, train_per_class=4, val_per_class=2)


# --- data ----------------------------------------------------------------------------------------------------------


def dataset_folder(work_dir, dataset, size, settings):
    """The dataset at `size` x `size` in the trainer's folder layout, built once."""
    folder = os.path.join(work_dir, "data", f"{dataset}_{size}_{settings.train_per_class}")
    if os.path.exists(os.path.join(folder, "val")):
        return folder
    log(f"building the {dataset} dataset at {size}x{size} in {folder}")
    partial = folder + ".partial"
    if os.path.exists(partial):
        import shutil

        shutil.rmtree(partial)
    if dataset == "digits":
        from training.prepare_digits import write_digits

        write_digits(partial, size)
    else:
        from training.prepare_photos import write_photos

        write_photos(partial, size, settings.train_per_class, settings.val_per_class)
    os.replace(partial, folder)
    return folder


def train_images(folder):
    train = os.path.join(folder, "train")
    return sum(len(os.listdir(os.path.join(train, name))) for name in os.listdir(train))


# --- one cell ------------------------------------------------------------------------------------------------------


def qat_bn_steps(cell, folder, settings):
    """0 (folded), or the steps of the first QAT epoch for batch_statistics."""
    if not RECIPES[cell.recipe].batch_statistics:
        return 0
    return math.ceil(train_images(folder) / settings.batch_size)


def float_lr(width):
    """The pipeline's float learning rate at `width` (3e-3 up to 1.0, 1e-3 above)."""
    from quantization.pipeline_stages import learning_rates

    return learning_rates(MODELS[width])[0]


def qat_lr(cell, settings):
    """The recipe's QAT rate, scaled with the float model's peak rate as the
    pipeline scales it: a width trained at a third of the rate is fine-tuned
    at a third of it."""
    return settings.qat_lr * RECIPES[cell.recipe].lr_factor * float_lr(cell.width) / float_lr(0.5)


def pipeline_arguments(cell, run_dir, folder, settings, variant=False):
    """The main job's flags for `cell`; a `variant` reuses another recipe's
    float model and exports (linked) and runs only the QAT and the report."""
    return [
        f"--output_dir={run_dir}",
        f"--model={MODELS[cell.width]}",
        f"--data={folder}",
        f"--image_size={cell.size}",
        f"--batch_size={settings.batch_size}",
        f"--float_epochs={settings.float_epochs}",
        f"--float_lr={float_lr(cell.width):g}",
        f"--qat_epochs={settings.qat_epochs}",
        f"--qat_lr={qat_lr(cell, settings):g}",
        f"--qat_bn_steps={qat_bn_steps(cell, folder, settings)}",
        f"--qat_warmup_steps={RECIPES[cell.recipe].warmup_steps}",
        f"--calibration_images={settings.calibration_images}",
        # Only where set: the flag came after committed runs (see finished_with).
        *([f"--qat_distillation={RECIPES[cell.recipe].distillation:g}"] if RECIPES[cell.recipe].distillation else []),
        "--stages=" + ("qat,report" if variant else "train,qat,export,report"),
    ]


def link_float_model(run_dir, float_run_dir):
    """A recipe variant fine-tunes the float model of the cell's first recipe
    (and is compared with its float and PTQ exports)."""
    os.makedirs(run_dir, exist_ok=True)
    for name in ("float", "tflite"):
        link = os.path.join(run_dir, name)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(float_run_dir, name)), link)


def run_cell(cell, work_dir, settings, float_run_dir=None):
    """Runs the pipeline for `cell`; returns its result entry."""
    folder = dataset_folder(work_dir, cell.dataset, cell.size, settings)
    run_dir = os.path.join(work_dir, "runs", cell.key)
    variant = float_run_dir is not None and float_run_dir != run_dir
    if variant:
        link_float_model(run_dir, float_run_dir)
    arguments = pipeline_arguments(cell, run_dir, folder, settings, variant)
    command_line = ["python", "-m", "quantization.pipeline", *arguments]
    if finished_with(run_dir, arguments):
        log(f"{cell.key}: the pipeline already ran with these flags in {run_dir}; reading its report")
        return read_cell(cell, run_dir, None, command_line)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "pipeline.log")
    log(f"{cell.key}: python -m quantization.pipeline {' '.join(arguments)}  (log: {log_path})")
    start = time.perf_counter()
    env = worker_environment(tf_log_level="2")
    with open(log_path, "w") as out:
        returncode = subprocess.call(
            [sys.executable, "-m", "quantization.pipeline", *arguments],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY_ROOT,
            env=env,
        )
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise RuntimeError(f"{cell.key}: the pipeline exited {returncode}; see {log_path}")
    entry = read_cell(cell, run_dir, seconds, command_line)
    log(f"{cell.key}: {cell_summary(entry)} ({seconds:.0f} s)")
    return entry


def finished_with(run_dir, arguments):
    """Whether `run_dir` holds a report of the pipeline run with `arguments`."""
    path = os.path.join(run_dir, "report", "pipeline_report.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        config = json.load(f)["config"]
    given = dict(argument[2:].split("=", 1) for argument in arguments if not argument.startswith("--stages="))
    return all(str(config.get(name, OLDER_RUNS.get(name))) == value for name, value in given.items())


def read_cell(cell, run_dir, seconds, command_line):
    with open(os.path.join(run_dir, "report", "pipeline_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(run_dir, "qat", "qat_selection.json")) as f:
        selection = json.load(f)
    # float_keras, qat_keras, float_tflite, ptq_int8, qat_int8
    top1 = {key.replace("_int8_tflite", "_int8"): row["top1"] for key, row in report["rows"].items()}
    return {
        **dataclasses.asdict(cell),
        "key": cell.key,
        "top1": top1,
        "selection": selection,
        "evaluation_images": report["evaluation_images"],
        "config": report["config"],
        "seconds": seconds,
        "machine": cpu_name() if seconds is not None else None,  # a reused run's machine is unknown
        "command": " ".join(command_line),
        "meets": meets_the_bar(top1),
    }


def meets_the_bar(top1):
    from quantization.pipeline_report import qat_meets_the_bar

    return qat_meets_the_bar(top1["qat_int8"], top1["ptq_int8"], top1["float_tflite"])


def cell_summary(entry):
    t = entry["top1"]
    return (
        f"float {t['float_tflite']:.4f}, PTQ int8 {t['ptq_int8']:.4f}, QAT int8 {t['qat_int8']:.4f} "
        f"({entry['selection']['chosen']}: {entry['selection']['fine_tuned_from']})"
    )


# --- the grid ------------------------------------------------------------------------------------------------------


def planned_cells(args):
    """Cheapest first (width, then size), so a cut-short run still fills whole rows."""
    return [
        Cell(dataset, size, width, recipe)
        for width in sorted(args.widths)
        for size in sorted(args.sizes)
        for dataset in args.datasets
        for recipe in (args.recipes or [main_recipe(width)])
    ]


def load_results(path):
    if not os.path.exists(path):
        return {"cells": {}}
    with open(path) as f:
        return json.load(f)


def save_results(results, output_dir):
    from training.run_config import write_json_atomically

    write_json_atomically(os.path.join(output_dir, f"{RESULT_NAME}.json"), results)
    with open(os.path.join(output_dir, f"{RESULT_NAME}.md"), "w") as f:
        f.write(markdown(results))
    try:
        plot(results, os.path.join(output_dir, f"{RESULT_NAME}.png"))
    except ImportError as error:  # matplotlib is optional
        log(f"no plot: {error}")


def trained_float_runs(work_dir, results):
    """{float key: run dir} of the cells already run whose run dir trained its
    own float model, so that a recipe run later fine-tunes that model."""
    found = {}
    for entry in results["cells"].values():
        cell = Cell(entry["dataset"], entry["size"], entry["width"], entry["recipe"])
        run_dir = os.path.join(work_dir, "runs", cell.key)
        float_dir = os.path.join(run_dir, "float")
        if os.path.isdir(float_dir) and not os.path.islink(float_dir):
            found.setdefault(cell.float_key, run_dir)
    return found


def run_grid(args, settings):
    os.makedirs(args.output_dir, exist_ok=True)
    results = load_results(os.path.join(args.output_dir, f"{RESULT_NAME}.json"))
    results["settings"] = dataclasses.asdict(settings)
    float_runs = trained_float_runs(args.work_dir, results)
    for cell in planned_cells(args):
        float_runs.setdefault(cell.float_key, os.path.join(args.work_dir, "runs", cell.key))
        if cell.key in results["cells"] and not args.rerun:
            log(f"{cell.key}: reused ({cell_summary(results['cells'][cell.key])})")
            continue
        try:
            entry = run_cell(cell, args.work_dir, settings, float_runs[cell.float_key])
        except Exception as error:  # one cell's failure must not lose the others
            log(f"{cell.key}: failed: {error}")
            continue
        # Re-read first: another invocation may have added cells meanwhile.
        results = load_results(os.path.join(args.output_dir, f"{RESULT_NAME}.json")) | {"settings": results["settings"]}
        results["cells"][cell.key] = entry
        save_results(results, args.output_dir)
    return results


# --- the report ----------------------------------------------------------------------------------------------------


def _pct(value):
    return f"{100 * value:.1f}"


def _chosen(entry):
    selection = entry["selection"]
    return "calibrated start" if selection["chosen"] == "start" else selection["fine_tuned_from"]


def main_table(cells):
    from benchmarks.report import table

    header = ("dataset", "size", "width", "recipe", "float TFLite", "PTQ int8", "QAT int8", "QAT - PTQ", "epoch chosen",
              "meets")  # fmt: skip
    rows = []
    for entry in sorted(cells, key=lambda e: (e["dataset"], e["size"], e["width"], e["recipe"])):
        t = entry["top1"]
        rows.append((entry["dataset"], entry["size"], f"{entry['width']:g}", entry["recipe"], _pct(t["float_tflite"]),
                     _pct(t["ptq_int8"]), _pct(t["qat_int8"]), f"{100 * (t['qat_int8'] - t['ptq_int8']):+.1f}",
                     _chosen(entry), "yes" if entry["meets"] else "NO"))  # fmt: skip
    return table(header, rows, align="lrrlrrrrll")


def _best_epoch(entry):
    """The best fine-tuned epoch's top-1 (fake-quant Keras) and which weights,
    ties going as the safeguard breaks them: the earlier epoch, EMA over raw."""
    best, label = None, "-"
    for epoch in entry["selection"]["epochs"]:
        kind = "EMA" if epoch["ema"] >= epoch["raw"] else "raw"
        value = max(epoch["raw"], epoch["ema"])
        if best is None or value > best:
            best, label = value, f"{epoch['epoch']} {kind}"
    return best, label


def recipe_table(cells):
    """The recipes side by side on each float model that more than one fine-tuned."""
    from benchmarks.report import table

    groups = {}
    for entry in cells:
        groups.setdefault((entry["dataset"], entry["size"], entry["width"]), {})[entry["recipe"]] = entry
    recipes = [name for name in RECIPES if any(name in group for group in groups.values())]
    rows = []
    for (dataset, size, width), group in sorted(groups.items()):
        if len(group) < 2:
            continue
        start = next(iter(group.values()))["selection"]["start"]["top1"]
        rows.append((dataset, size, f"{width:g}", _pct(start), *(_recipe_cell(group.get(name)) for name in recipes)))
    header = ("dataset", "size", "width", "calibrated start", *(f"{name}: best epoch / QAT int8" for name in recipes))
    return table(header, rows, align="lrrr" + "l" * len(recipes)) if rows else ""


def recipe_summary(cells):
    """Per recipe: its cells, how many meet the bar, and the mean QAT int8
    and QAT - PTQ over them (recipes ran on different sets of cells)."""
    from benchmarks.report import table

    rows = []
    for name, recipe in RECIPES.items():
        entries = [entry for entry in cells if entry["recipe"] == name]
        if not entries:
            continue
        qat = [entry["top1"]["qat_int8"] for entry in entries]
        gain = [entry["top1"]["qat_int8"] - entry["top1"]["ptq_int8"] for entry in entries]
        rows.append((name, f"{recipe.distillation:g}", len(entries), sum(entry["meets"] for entry in entries),
                     _pct(sum(qat) / len(qat)), f"{100 * sum(gain) / len(gain):+.1f}"))  # fmt: skip
    header = ("recipe", "distillation", "cells", "bar met", "mean QAT int8", "mean QAT - PTQ")
    return table(header, rows, align="lrrrrr")


def _recipe_cell(entry):
    if entry is None:
        return "-"
    value, label = _best_epoch(entry)
    return f"{_pct(value)} (epoch {label}) / {_pct(entry['top1']['qat_int8'])}"


def _lr_factors():
    """'x5 for folded_lr_x5, folded_lr_x5_warmup': the recipes that scale --qat_lr."""
    groups = {}
    for name, recipe in RECIPES.items():
        if recipe.lr_factor != 1.0:
            groups.setdefault(recipe.lr_factor, []).append(name)
    return "; ".join(f"x{factor:g} for {', '.join(names)}" for factor, names in groups.items())


def _machines(entries):
    names = sorted({entry.get("machine") or "not recorded" for entry in entries})
    return "; ".join(names)


def main_cells(results):
    """The cells of the package's recipe (the main table; the other recipes go to the recipe table)."""
    return [entry for entry in results["cells"].values() if entry["recipe"] == main_recipe(entry["width"])]


def _package_recipes(cells):
    """'folded_lr_x5_warmup at width 0.5, 1; folded_lr_x5_warmup_distill_half at width 2'."""
    widths = {}
    for entry in cells:
        widths.setdefault(entry["recipe"], set()).add(entry["width"])
    return "; ".join(f"{name} at width {', '.join(f'{w:g}' for w in sorted(found))}" for name, found in widths.items())


def _float_lrs(entries):
    """'3e-3 (width 0.5, 1) and 1e-3 (width 2)': the float learning rates the cells were trained with."""
    widths = {}
    for entry in entries:
        widths.setdefault(entry["config"]["float_lr"], set()).add(entry["width"])
    return " and ".join(
        f"{lr:g} (width {', '.join(f'{w:g}' for w in sorted(ws))})" for lr, ws in sorted(widths.items(), reverse=True)
    )


def markdown(results):
    from quantization.pipeline_report import FLOAT_MARGIN

    everything = list(results["cells"].values())
    cells = main_cells(results)  # the others: recipe_table
    settings = results.get("settings", {})
    met = sum(entry["meets"] for entry in cells)
    parts = [
        "# QAT int8 against PTQ int8 and float, per width, dataset and input size",
        "",
        f"- Top-1 (%) on the whole validation split (digits: 359 images, photos: 600 unless --tiny); "
        f"{settings.get('float_epochs')} float epochs at peak lr {_float_lrs(everything)}, "
        f"{settings.get('qat_epochs')} QAT epochs at lr "
        f"{settings.get('qat_lr')} times the recipe's factor ({_lr_factors()}) and the float rate's ratio to "
        f"{float_lr(0.5):g}, "
        f"batch {settings.get('batch_size')}, "
        f"{settings.get('calibration_images')} calibration images.",
        f"- The package's recipe, the pipeline's defaults ({_package_recipes(cells)}; the others are compared "
        "below). The bar: QAT int8 >= max(PTQ "
        f"int8, float - {100 * FLOAT_MARGIN:.1f} points). Met in {met} of {len(cells)} cells.",
        f"- Trained on: {_machines(everything)}. A seeded run gives the same model on one machine, not on another "
        "CPU (other float kernels), so the cells move by a few images from machine to machine.",
        "- 'epoch chosen': the safeguard's pick on the validation split (the calibrated start, or an epoch's raw "
        "or EMA weights); the same split reports the figures, so the chosen epoch's figure is optimistic.",
        "",
        main_table(cells),
        "",
    ]
    recipes = recipe_table(everything)
    if recipes:
        parts += [
            "Each recipe over the cells it ran on ('distillation': the float model's share of the QAT targets, "
            "`--qat_distillation`; 0: the labels only):",
            "",
            recipe_summary(everything),
            "",
            "Recipes on the same float model: the best fine-tuned epoch's top-1 (fake-quant Keras, whole "
            "validation split) and the exported QAT int8 TFLite's; the calibrated start is the fake-quant model "
            "before any step.",
            "",
            recipes,
            "",
        ]
    parts += [
        "Commands (one per cell; `python -m benchmarks.qat_fidelity` runs them all):",
        "",
    ]
    parts += [f"- `{entry['command']}`" for entry in sorted(everything, key=lambda e: e["key"])]
    return "\n".join(parts) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    groups = {}
    for entry in results["cells"].values():
        groups.setdefault((entry["dataset"], entry["size"], entry["width"]), []).append(entry)
    if not groups:
        return
    columns = min(4, len(groups))
    rows = -(-len(groups) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (key, entries) in zip(axes.flat, sorted(groups.items())):
        _plot_group(axis, key, entries)
    for axis in list(axes.flat)[len(groups) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _plot_group(axis, key, entries):
    dataset, size, width = key
    top1 = entries[0]["top1"]
    axis.axhline(100 * top1["float_tflite"], color="black", linestyle="--", label="float TFLite")
    axis.axhline(100 * top1["ptq_int8"], color="gray", linestyle=":", label="PTQ int8")
    for entry, color in zip(
        sorted(entries, key=lambda e: e["recipe"]), ("tab:blue", "tab:orange", "tab:green", "tab:red")
    ):
        selection = entry["selection"]
        epochs = [0] + [e["epoch"] for e in selection["epochs"]]
        start = 100 * selection["start"][selection["metric"]]
        axis.plot(epochs, [start] + [100 * e["raw"] for e in selection["epochs"]], "o-", color=color,
                  label=f"QAT Keras, {entry['recipe']}")  # fmt: skip
        axis.plot(epochs, [start] + [100 * e["ema"] for e in selection["epochs"]], "x:", color=color)
        axis.plot([epochs[-1] + 0.3], [100 * entry["top1"]["qat_int8"]], "*", color=color, markersize=12)
    axis.set_title(f"{dataset} {size}x{size}, width {width:g}", fontsize=9)
    axis.set_xlabel("QAT epoch (0: calibrated start; *: exported QAT int8)", fontsize=7)
    axis.set_ylabel("top-1 (%)", fontsize=8)
    axis.legend(fontsize=6)


# --- command line --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0, 2.0], choices=sorted(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48])
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=sorted(RECIPES),
        help="QAT recipes to run on each cell (default: the package's recipe at each width, main_recipe).",
    )
    parser.add_argument("--work_dir", default="runs/qat_fidelity")
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--float_epochs", type=int)
    parser.add_argument("--qat_epochs", type=int)
    parser.add_argument("--qat_lr", type=float)
    parser.add_argument("--rerun", action="store_true", help="Run cells again that the results already hold.")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="A smoke run (not a measurement): 3 float epochs, 1 QAT epoch, 8 calibration images; "
        "photos: 4 images a class (the digits are all used).",
    )
    args = parser.parse_args(argv)
    if min(args.sizes) < 32:
        parser.error(f"--sizes must be at least 32 (the classifiers' smallest input); got {args.sizes}")
    return args


def settings_from_args(args):
    base = TINY if args.tiny else Settings()
    given = {name: getattr(args, name) for name in ("float_epochs", "qat_epochs", "qat_lr")}
    return dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    settings = settings_from_args(args)
    results = run_grid(args, settings)
    print(markdown(results), flush=True)
    return 0 if results["cells"] else 1


if __name__ == "__main__":
    sys.exit(main())
