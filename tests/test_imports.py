"""Import structure of the project (issue 14), read with `ast`, nothing imported.

- no import circles between project modules, counting imports inside
  functions too: a deferred import hides a circle, it does not remove it;
- no private name (`_name`) of one project module used by another;
- no Keras internals: `keras.src...` imports or Keras' private attributes.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("keras_mobilevitv2", "training", "quantization", "benchmarks")
# Private attributes of other objects that project code may not call (Keras
# has public ways, or the project keeps its own helper).
KERAS_PRIVATE = ("_flatten_layers", "_layers", "_tracker", "_trainable_variables")


def _module_files():
    """{module name: path} for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if not file.endswith(".py"):
                    continue
                path = os.path.join(directory, file)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


MODULES = _module_files()
TREES = {name: ast.parse(open(path, encoding="utf-8").read(), path) for name, path in MODULES.items()}


def _absolute(module, node):
    """The absolute module name a `from ... import` statement reads from."""
    if not node.level:
        return node.module
    package = module.split(".")
    is_package = MODULES[module].endswith("__init__.py")
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(name):
    """The longest project module `name` starts with, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module):
    """[(imported module, names imported from it or None, line)], all levels."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            found.append((source, [alias.name for alias in node.names], node.lineno))
    return found


def _edges(module):
    """{project module imported by `module`: first line}. `from package import
    submodule` counts as an import of the submodule, not of the package."""
    edges = {}
    for source, names, line in _imports(module):
        targets = [_project_module(source)]
        if names:
            submodules = [f"{source}.{name}" for name in names if f"{source}.{name}" in MODULES]
            if len(submodules) == len(names):
                targets = submodules
            else:
                targets += submodules
        for target in targets:
            if target and target != module:
                edges.setdefault(target, line)
    return edges


GRAPH = {module: _edges(module) for module in MODULES}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def _describe(component):
    members = set(component)
    return "\n".join(
        f"  {module} -> {target} (line {line})"
        for module in component
        for target, line in sorted(GRAPH[module].items())
        if target in members
    )


def test_the_scan_finds_the_project():
    assert {"quantization.export", "training.train", "benchmarks.latency", "keras_mobilevitv2"} <= MODULES.keys()
    assert "quantization.targets" in GRAPH["quantization.export"]  # a function-level import
    assert "keras_mobilevitv2.layers.folding" in GRAPH["keras_mobilevitv2.layers.inverted_residual"]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n\n".join(_describe(cycle) for cycle in cycles)


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(module):
    """{local name: project module} for names bound to project modules."""
    aliases = {}
    for source, names, _ in _imports(module):
        if names is None:
            if _project_module(source):
                aliases[source.split(".")[0]] = source.split(".")[0]
            continue
        for name in names:
            if f"{source}.{name}" in MODULES:
                aliases[name] = f"{source}.{name}"
    for node in ast.walk(TREES[module]):  # `import a.b as c` binds c to a.b
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and _project_module(alias.name) == alias.name:
                    aliases[alias.asname] = alias.name
    return aliases


def _dotted(node):
    """ "a.b.c" for a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _private_uses(module):
    found = []
    for source, names, line in _imports(module):
        if source.startswith("keras.src") or source == "keras" and names and "src" in names:
            found.append(f"{module}:{line} imports Keras internals from {source}")
        if names and _project_module(source):
            found += [f"{module}:{line} imports {source}.{name}" for name in names if _private(name)]
    aliases = _module_aliases(module)
    for node in ast.walk(TREES[module]):
        if not isinstance(node, ast.Attribute):
            continue
        base = _dotted(node.value)
        if node.attr in KERAS_PRIVATE:
            found.append(f"{module}:{node.lineno} uses Keras' private {node.attr}")
        elif base == "keras" and node.attr == "src":
            found.append(f"{module}:{node.lineno} uses keras.src")
        elif _private(node.attr) and base:
            head, _, rest = base.partition(".")
            target = aliases.get(head)
            if target and _project_module(".".join([target] + ([rest] if rest else []))):
                found.append(f"{module}:{node.lineno} uses {base}.{node.attr}")
    return found


def test_no_private_names_across_modules():
    found = [use for module in sorted(MODULES) for use in _private_uses(module)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from quantization.export import _secret\n", "imports quantization.export._secret"),
        ("from keras.src.backend.config import keras_home\n", "Keras internals"),
        ("import benchmarks.latency as latency\nlatency._row()\n", "uses latency._row"),
        ("def f(model):\n    return model._flatten_layers()\n", "private _flatten_layers"),
    ],
)
def test_the_private_name_check_catches(source, expected, monkeypatch):
    monkeypatch.setitem(MODULES, "probe", os.path.join(ROOT, "probe.py"))
    monkeypatch.setitem(TREES, "probe", ast.parse(source))
    assert any(expected in use for use in _private_uses("probe"))


def test_the_cycle_check_catches_function_level_imports(monkeypatch):
    monkeypatch.setitem(MODULES, "training.probe", os.path.join(ROOT, "training", "probe.py"))
    monkeypatch.setitem(TREES, "training.probe", ast.parse("def f():\n    from training import train\n"))
    assert "training.train" in _edges("training.probe")
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c"]]
