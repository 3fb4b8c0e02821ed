"""The README's benchmark tables, rendered from the committed results.

    python -m benchmarks.readme [--check] [--results_dir benchmarks/results] [--readme README.md]

Every table between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`
in the README is rendered here from `RESULTS_DIR/<file>.json` by the
benchmark's own report code; this command rewrites them in place, and
`--check` only says whether they are current (tests/test_readme_results.py
runs it). Blocks:
  latency       - ms per batch of this package and every peer, float and
                  int8, with ours / fastest peer (benchmarks.run: results.json,
                  its latency and converters sections);
  v1_v2         - MobileViT v1 against v2 (results.json, v1_v2 section);
  op_profile    - time by op kind, per model (op_profile.json);
  qat_graph     - the QAT int8 graph against PTQ int8 and float (qat_graph.json);
  int8_efficiency - int8 GMAC/s against MobileNetV2's (int8_efficiency.json);
  qat_fidelity  - QAT int8 against PTQ int8 and float (qat_fidelity.json).
"""

import argparse
import json
import os
import re
import sys

OURS = "keras_mobilevitv2"
# (label, latency-section implementation or converters-section (converter, form)).
KERAS_PEERS = (("kimm", "kimm"), ("kecam (tf_keras)", "kecam"))
CONVERTER_PEERS = (
    ("litert-torch (timm, patched)", ("litert_torch", "patched")),
    ("onnx2tf (timm)", ("onnx2tf", "stock")),
)
BLOCK = re.compile(r"(<!-- bench:(\w+):start -->\n)(.*?)\n?(<!-- bench:\2:end -->)", re.S)


def _load(results_dir, name):
    with open(os.path.join(results_dir, f"{name}.json")) as f:
        return json.load(f)


# --- the latency excerpt -------------------------------------------------------------------------------------------


def _latency_ms(rows, implementation, width, batch, runtime):
    from benchmarks.report import find_row
    from benchmarks.report import median_ms

    return median_ms(find_row(rows, implementation=implementation, width=width, batch=batch, runtime=runtime))


def _converter_ms(rows, converter, form, width, batch, precision):
    from benchmarks.report import find_row
    from benchmarks.report import median_ms

    key = {"converter": converter, "form": form, "width": width, "batch": batch, "precision": precision}
    return median_ms(find_row(rows, **key))


def excerpt_cells(results, width, batch):
    """{row label: (our ms, peer ms) or our ms}: one column of the excerpt, and
    the ratio pairs (ours timed in the same phase as the peer)."""
    latency = results["latency"]
    converters = (results.get("converters") or {}).get("rows", [])
    ours = {runtime: _latency_ms(latency, OURS, width, batch, runtime)
            for runtime in ("tflite_float", "tflite_int8", "tflite_int8_qat")}  # fmt: skip
    ours_in_turn = {precision: _converter_ms(converters, OURS, "-", width, batch, precision)
                    for precision in ("float32", "int8", "int8 QAT")}  # fmt: skip
    pairs = {"float": [], "int8": [], "int8_qat": []}
    for label, key in KERAS_PEERS:
        peer_float, peer_int8 = (_latency_ms(latency, key, width, batch, r) for r in ("tflite_float", "tflite_int8"))
        pairs["float"].append((label, ours["tflite_float"], peer_float))
        pairs["int8"].append((label, ours["tflite_int8"], peer_int8))
        pairs["int8_qat"].append((label, ours["tflite_int8_qat"], peer_int8))
    for label, (converter, form) in CONVERTER_PEERS:
        peer_float, peer_int8 = (
            _converter_ms(converters, converter, form, width, batch, p) for p in ("float32", "int8")
        )
        pairs["float"].append((label, ours_in_turn["float32"], peer_float))
        pairs["int8"].append((label, ours_in_turn["int8"], peer_int8))
        pairs["int8_qat"].append((label, ours_in_turn["int8 QAT"], peer_int8))
    return ours, ours_in_turn, pairs


def _ms(value):
    from benchmarks.report import ms

    return ms(value) if value else "n/a"


def _fastest_peer(pairs):
    """'ours / fastest peer' over the peers that ran: the largest ratio."""
    ratios = [(mine / peer, label) for label, mine, peer in pairs if mine and peer]
    if not ratios:
        return "-"
    value, label = max(ratios)
    return f"{value:.2f}x ({label})"


def latency_excerpt(results):
    settings = results["settings"]
    columns = [(w, b) for w in settings["widths"] for b in settings["batch_sizes"]]
    cells = {column: excerpt_cells(results, *column) for column in columns}
    lines = ["| ms per batch, 256x256 | " + " | ".join(f"{w:.1f}, b{b}" for w, b in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))

    def add(label, render):
        lines.append(f"| {label} | " + " | ".join(render(*cells[column]) for column in columns) + " |")

    add("this package, TFLite float / PTQ int8 / QAT int8",
        lambda o, t, p: " / ".join(_ms(o[r]) for r in ("tflite_float", "tflite_int8", "tflite_int8_qat")))  # fmt: skip
    for index, (label, _) in enumerate(KERAS_PEERS + CONVERTER_PEERS):
        add(f"{label}, float / int8", lambda o, t, p, i=index: f"{_ms(p['float'][i][2])} / {_ms(p['int8'][i][2])}")
    add("this package in the converters' turns: float / PTQ / QAT",
        lambda o, t, p: " / ".join(_ms(t[k]) for k in ("float32", "int8", "int8 QAT")))  # fmt: skip
    add("**ours / fastest peer, float**", lambda o, t, p: _fastest_peer(p["float"]))
    add("**ours (PTQ) / fastest peer, int8**", lambda o, t, p: _fastest_peer(p["int8"]))
    add("**ours (QAT) / fastest peer, int8**", lambda o, t, p: _fastest_peer(p["int8_qat"]))
    return "\n".join(lines)


# --- the other blocks ----------------------------------------------------------------------------------------------


def _tables_after(text, heading):
    """The first markdown table after the line `heading` in `text`."""
    lines = text.splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def v1_v2_block(results):
    from benchmarks import v1_v2

    section = v1_v2.in_run(results["v1_v2"], results["environment"])
    return _tables_after(v1_v2.markdown(section), "## Latency (ms) and v1 / v2")


def op_profile_block(result):
    from benchmarks import op_profile

    blocks = []
    for entry in result["widths"]:
        blocks.append(f"Width {entry['width']:g}:\n\n{op_profile.kind_table(entry['profiles'], top=8)}")
        delegation = op_profile.delegation_lines(entry["profiles"])
        if delegation:
            blocks.append("\n".join(delegation))
    return "\n\n".join(blocks)


def qat_fidelity_block(result):
    from benchmarks import qat_fidelity

    return qat_fidelity.main_table(qat_fidelity.main_cells(result))


def qat_graph_block(result):
    from benchmarks import qat_graph

    return _first_table(qat_graph.markdown(result))


def int8_efficiency_block(result):
    from benchmarks import int8_efficiency

    return int8_efficiency.rate_table(result)


def _first_table(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


RENDERERS = {
    "latency": ("results", latency_excerpt),
    "v1_v2": ("results", v1_v2_block),
    "op_profile": ("op_profile", op_profile_block),
    "qat_fidelity": ("qat_fidelity", qat_fidelity_block),
    "qat_graph": ("qat_graph", qat_graph_block),
    "int8_efficiency": ("int8_efficiency", int8_efficiency_block),
}


def render(name, results_dir):
    result_name, renderer = RENDERERS[name]
    return renderer(_load(results_dir, result_name))


def update(text, results_dir):
    """`text` with every bench block re-rendered; (new text, names of stale blocks)."""
    stale = []

    def replace(match):
        name = match.group(2)
        if name not in RENDERERS:
            raise ValueError(f"README block {name!r} has no renderer; known: {sorted(RENDERERS)}")
        body = render(name, results_dir)
        if body != match.group(3):
            stale.append(name)
        return match.group(1) + body + "\n" + match.group(4)

    return BLOCK.sub(replace, text), stale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only say whether the README's tables are current.")
    parser.add_argument("--results_dir", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    new_text, stale = update(text, args.results_dir)
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "README benchmark tables are current")
        return 1 if stale else 0
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(new_text)
    print(f"rewrote {', '.join(stale)}" if stale else "nothing to rewrite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
