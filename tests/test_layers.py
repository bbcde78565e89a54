"""The package keeps its shape: imports go one way (entry points -> run assembly -> training parts -> models and
data -> utilities), nothing imports the training recipe (`vlm_finetune.train`) but the entry point, and no
source file grows past what one reader holds in mind. Imports are read with `ast`, function-level ones
included, so a cycle cannot hide inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlm_finetune"
MAX_LINES = 450

# the layer of each module (the longest matching prefix wins); lower layers never import higher ones
LAYERS = [
    ("entry", ("vlm_finetune.__main__", "vlm_finetune.plan", "vlm_finetune.export", "vlm_finetune.generate",
               "vlm_finetune.bench")),
    ("run", ("vlm_finetune.train", "vlm_finetune.config", "vlm_finetune.config_checks", "vlm_finetune.rundir",
             "vlm_finetune.bench.measure",
             "vlm_finetune.autotune", "vlm_finetune.memory.planner", "vlm_finetune.memory.load_plan",
             "vlm_finetune.memory.suggest", "vlm_finetune.memory.oom")),
    ("training", ("vlm_finetune.module", "vlm_finetune.strategies", "vlm_finetune.running_strategy", "vlm_finetune.fsdp",
                  "vlm_finetune.zero3_nf4",
                  "vlm_finetune.load_turns",
                  "vlm_finetune.checkpointing",
                  "vlm_finetune.resume",
                  "vlm_finetune.adapters", "vlm_finetune.callbacks", "vlm_finetune.memory", "vlm_finetune.trainability",
                  "vlm_finetune.loss", "vlm_finetune.data.datamodule", "vlm_finetune.plots", "vlm_finetune.watchdog")),
    ("models", ("vlm_finetune.models", "vlm_finetune.data")),
    ("utilities", ("vlm_finetune.io", "vlm_finetune.precision", "vlm_finetune.settings",
                   "vlm_finetune.hardware",
                   "vlm_finetune.errors", "vlm_finetune.signals", "vlm_finetune.data.sample",
                   "vlm_finetune.data.batch", "vlm_finetune")),
]
ORDER = [name for name, _ in LAYERS]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported vlm_finetune module, line, inside a function) for every import in the file. `from a import b`
    names the module a.b when that is a module, else a."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path)
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("vlm_finetune"):
                        found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = own.split(".") if is_package else own.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("vlm_finetune"):
                    for alias in child.names:
                        target = f"{base}.{alias.name}"
                        found.append((target if target in modules else base, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: what it names and the packages above them (importing a.b.c
    runs a/__init__ and a/b/__init__ first)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, _, _ in imports_of(path, modules):
            parts = target.split(".")
            edges |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & modules.keys()
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def layer_of(module: str) -> str:
    best = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (layer, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_the_import_graph_of_the_package_has_no_cycle():
    found = cycles(import_graph())
    assert found == [], f"import cycles: {found}"


def test_the_cycle_finder_finds_a_planted_cycle():
    # the check above must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_but_the_entry_point_imports_the_training_recipe():
    modules = package_modules()
    offenders = [f"{name} (line {line})" for name, path in modules.items()
                 for target, line, _ in imports_of(path, modules)
                 if target == "vlm_finetune.train" and name != "vlm_finetune.__main__"]
    assert offenders == []


def test_imports_go_down_the_layers_only():
    modules = package_modules()
    upward = []
    for name, path in modules.items():
        for target, line, _ in imports_of(path, modules):
            if ORDER.index(layer_of(target)) < ORDER.index(layer_of(name)):
                upward.append(f"{name}:{line} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    assert upward == []


def test_no_source_file_is_longer_than_the_limit():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines: {long}"


def test_function_level_imports_are_found():
    # a function-level import counts as an edge like a top-level one (cycles must not hide in functions)
    modules = package_modules()
    found = imports_of(PACKAGE / "__main__.py", modules)
    assert any(target == "vlm_finetune.train" and in_function for target, _, in_function in found)


def test_the_code_passes_ruff():
    """The lint configuration in pyproject.toml ([tool.ruff]) holds for the package and the tests."""
    import subprocess
    import sys

    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "vlm_finetune", "tests"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


# -- settings, not config nodes, below the edge ---------------------------------------------------------
CONFIG_LIBRARIES = ("omegaconf", "hydra")
# where the composed config is read: the recipe and the Hydra edge (the entry points above them)
CONFIG_EDGE = ("vlm_finetune.train", "vlm_finetune.config")


def _below_run(name: str) -> bool:
    """Below the edge: every module but the entry points, the recipe and config.py (the planner, autotune,
    suggestions and the run folder included)."""
    return layer_of(name) != "entry" and name not in CONFIG_EDGE


def config_node_leaks(path: Path) -> list[str]:
    """Imports of omegaconf/hydra (function-level ones included) and parameters named `cfg` or `*_cfg` in a
    module's source."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in CONFIG_LIBRARIES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in \
                CONFIG_LIBRARIES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and (arg.arg == "cfg" or arg.arg.endswith("_cfg")):
                    where = getattr(node, "name", "lambda")
                    found.append(f"line {node.lineno}: {where}({arg.arg})")
    return found


def test_below_the_run_assembly_nothing_takes_a_config_node():
    """Everything below the edge (train.py, config.py and the entry points) takes typed settings
    (vlm_finetune/settings.py), read once by config.read_settings: no omegaconf or hydra import, no parameter named
    cfg / *_cfg."""
    leaks = {name: found for name, path in package_modules().items()
             if _below_run(name) and (found := config_node_leaks(path))}
    assert leaks == {}


def test_the_config_node_check_finds_a_planted_parameter_and_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f(cfg):\n    return cfg\n\n\ndef g(x, model_cfg=None):\n    import omegaconf\n"
                       "    from hydra.utils import instantiate\n    return x\n")
    assert config_node_leaks(planted) == ["line 1: f(cfg)", "line 5: g(model_cfg)", "line 6: import omegaconf",
                                          "line 7: from hydra.utils import ..."]
    clean = tmp_path / "clean.py"
    clean.write_text("def f(settings, config):\n    return settings\n")
    assert config_node_leaks(clean) == []
    # the layers the rule applies to: a training part and a model module are below, the recipe is not
    assert _below_run("vlm_finetune.strategies") and _below_run("vlm_finetune.models.mgm.family")
    assert _below_run("vlm_finetune.memory.planner") and _below_run("vlm_finetune.autotune")
    assert not _below_run("vlm_finetune.train") and not _below_run("vlm_finetune.config")
