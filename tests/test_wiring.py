"""Each stage's `deps` and `params` in dvc.yaml, held against what its code imports and reads (statically, by `ast`).

Code: a stage's `.py` deps must equal the project modules `stages/<command>.py` imports, transitively (imports inside
function bodies count): a missing file means editing code the stage runs does not re-run it; an extra one means
needless re-runs. Decisions:
  - a package's `__init__.py` counts when one of its modules is imported (Python runs it), unless it holds nothing
    but a docstring (today `stages/__init__.py`): it cannot change a result; should it gain code, it is required.
  - `stages/cli.py` is not a dep: the `kd` entry point imports it, and with it every stage module, but it only
    assembles the commands; a stage's result depends on its own command's code, not on its siblings'.
Params: every key the stage's code (`stages/` modules in its closure) reads must be declared, and every declared
key read. A whole section passed on (`load_dataset(params.data)`, `run_distill(..., cfg, ...)`) reads all its keys.
`device`, `num_workers`, `memory_mb` and `search.processes` are never declared: by design they never change a
result. Other exceptions are listed below with their reasons (an entry no longer needed fails too); the baseline
(`kd distill --baseline`) must not declare `BASELINE_EXCLUDED`.
Paths: every out/metric/plot lies at or under a path in `cmd`, and every other dep is in `cmd` or is the data
folder (`${data.root}`), which the stage finds through params (so it must read `data.root`).
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]  # safe_load resolves the *distill_deps alias

NEVER_CHANGE_RESULTS = {"device", "num_workers", "memory_mb", "search.processes"}
# Keys read by a stage's code but rightly not declared, with the reason.
READ_NOT_DECLARED = {
    "cache": {"cache.batch_size": "only batches the teacher's eval-mode forward pass; the logits do not depend on it",
              "cache.compile": "runs the same forward compiled; the logits agree within float32 rounding (measured)"},
    # kd search passes `distill` on whole, but sets T and λ per trial, trains search.epochs epochs and always reads
    # the store: re-running the search when distill's T, λ or epochs change (e.g. after --write-params) is waste.
    "distill": {"cache.format": "names the default --cache only (dvc.yaml passes --cache)"},
    "baseline": {"cache.format": "names the default --cache only (dvc.yaml passes --cache)"},
    "search": {"cache.format": "names the default --cache only (dvc.yaml passes --cache)",
               "distill.temperature": "set per trial from the search's draws",
               "distill.kd_weight": "set per trial from the search's draws",
               "distill.epochs": "trials train search.epochs epochs",
               "distill.teacher_source": "trials always read the store"},
}
# The baseline trains the student alone (kd_weight 0): T, λ and α are unused, and teacher_source, topk_tail (and
# cache.amp, the online teacher's precision) only shape the never-used targets; the baseline never reads targets, so
# neither do the ensemble's weights and rule. Its code reads them; it must not re-run.
BASELINE_EXCLUDED = {"distill.temperature", "distill.kd_weight", "distill.ce_weight", "distill.teacher_source",
                     "distill.topk_tail", "cache.amp", "distill.ensemble.rule", "distill.ensemble.weights"}
# Declared keys the code does not read, with the reason: none today.
DECLARED_NOT_READ: dict[str, dict[str, str]] = {}
# Non-code deps found through params rather than the command line: dep -> the param key that locates it.
DATA_DEPS = {"${data.root}": "data.root"}


def stage_module(stage: str) -> Path:
    """`stages/<command>.py` for a stage whose cmd is `kd <command> ...`."""
    kd, command = STAGES[stage]["cmd"].split()[:2]
    assert kd == "kd", f"{stage}: cmd should start with `kd`"
    return ROOT / "stages" / f"{command}.py"


def is_trivial(path: Path) -> bool:
    """True when a file holds nothing but (at most) a docstring."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def module_files(name: str) -> set[Path]:
    """Project files Python runs to import dotted module `name`: each package's `__init__.py`, then the module."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return set()
    files = {ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)}
    files.add(ROOT.joinpath(*parts[:-1], parts[-1] + ".py"))
    return {f for f in files if f.is_file() and not (f.name == "__init__.py" and is_trivial(f))}


def imported_files(path: Path) -> set[Path]:
    """Project files imported anywhere in `path` (module level or inside functions)."""
    package = path.relative_to(ROOT).parent.parts
    files = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                files |= module_files(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            files |= module_files(module)
            for alias in node.names:  # `from pipeline import data` imports the module pipeline/data.py
                files |= module_files(f"{module}.{alias.name}")
    return files


def import_closure(path: Path) -> set[Path]:
    """`path` and every project file it imports, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_files(current) - seen)
    return seen


def params_tree() -> dict:
    """The `Params` dataclass tree of pipeline/params.py as nested dicts: {field: subtree, or None for a leaf}."""
    classes = {node.name: node for node in ast.parse((ROOT / "pipeline/params.py").read_text()).body
               if isinstance(node, ast.ClassDef) and node.decorator_list}

    def fields(cls: ast.ClassDef) -> dict:
        return {f.target.id: fields(classes[f.annotation.id])
                if isinstance(f.annotation, ast.Name) and f.annotation.id in classes else None
                for f in cls.body if isinstance(f, ast.AnnAssign)}

    return fields(classes["Params"])


TREE = params_tree()


def subtree(key: str) -> dict | None:
    """The params subtree at dotted `key` ("" is the root; None for a leaf); an error for an unknown key."""
    node = TREE
    for part in filter(None, key.split(".")):
        assert isinstance(node, dict) and part in node, f"unknown params key {key!r}"
        node = node[part]
    return node


def leaves(key: str) -> set[str]:
    """Every leaf key at or under dotted `key`."""
    node = subtree(key)
    return {key} if node is None else set().union(*(leaves(f"{key}.{k}".lstrip(".")) for k in node))


def chain_key(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The params key an expression like `params.distill.optimizer.lr` or `cfg.epochs` names, or None.

    The chain stops at the first attribute that is not a params field (`params.augment.copy` is `augment`).
    """
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    key = aliases[node.id]
    for attr in reversed(attrs):
        if not isinstance(subtree(key), dict) or attr not in subtree(key):
            break
        key = f"{key}.{attr}".lstrip(".")
    return key


def params_read(path: Path) -> set[str]:
    """Leaf params keys the code in `path` reads, where `params` is the loaded Params and `cfg = params.x` aliases.

    Any use of a section other than through one of its attributes (passing it on) reads all its keys; the whole
    `params` does so only when passed to a call (`setup` returning it reads nothing).
    """
    tree = ast.parse(path.read_text())
    aliases, alias_values = {"params": ""}, set()
    for _ in range(3):  # sections only, and aliases of aliases (`opt = cfg.optimizer`)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                key = chain_key(node.value, aliases)
                if key is not None and subtree(key) is not None and node.targets[0].id != "params":
                    aliases[node.targets[0].id] = key
                    alias_values.add(id(node.value))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    args = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) for a in n.args + [k.value for k in n.keywords]}
    reads = set()
    for node in ast.walk(tree):
        if (isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load)
                and id(node) not in inner | alias_values):
            key = chain_key(node, aliases)
            if key is not None and (key or id(node) in args):  # `return params` (setup) reads nothing itself
                reads |= leaves(key)
    return reads


def stage_code(stage: str) -> set[Path]:
    """The project files the stage's command runs."""
    return import_closure(stage_module(stage))


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_modules_the_stage_imports(stage):
    declared = {ROOT / d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    closure = stage_code(stage)
    missing = sorted(str(p.relative_to(ROOT)) for p in closure - declared)
    extra = sorted(str(p.relative_to(ROOT)) for p in declared - closure)
    assert not missing and not extra, f"{stage}: deps missing (code it runs) {missing}; deps extra (not run) {extra}"


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_exactly_the_keys_the_stage_reads(stage):
    declared = set().union(*(leaves(entry) for entry in STAGES[stage].get("params", [])))
    read = set().union(*(params_read(p) for p in stage_code(stage) if p.parent.name == "stages"))
    excluded = BASELINE_EXCLUDED if stage == "baseline" else set()
    assert not declared & excluded, f"{stage}: declares keys it must not re-run for: {sorted(declared & excluded)}"
    undeclared = read - declared - NEVER_CHANGE_RESULTS - excluded - set(READ_NOT_DECLARED.get(stage, {}))
    unread = declared - read - set(DECLARED_NOT_READ.get(stage, {}))
    assert not undeclared and not unread, (f"{stage}: read but not declared {sorted(undeclared)}; "
                                           f"declared but not read {sorted(unread)}")
    stale = set(READ_NOT_DECLARED.get(stage, {})) - (read - declared)
    assert not stale, f"{stage}: allow-list entries no longer needed: {sorted(stale)}"


def in_cmd(path: str, cmd: str) -> bool:
    """True when `path`, or a folder holding it, is a word of `cmd` (`${...}` templates compared as written)."""
    return any(path == word or path.startswith(word.rstrip("/") + "/") for word in cmd.split())


@pytest.mark.parametrize("stage", STAGES)
def test_outputs_and_data_deps_appear_in_the_command(stage):
    spec, cmd = STAGES[stage], STAGES[stage]["cmd"]
    outputs = [next(iter(o)) if isinstance(o, dict) else o
               for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])]
    absent = [o for o in outputs if not in_cmd(o, cmd)]
    assert not absent, f"{stage}: outputs not in its cmd: {absent}"
    data = [d for d in spec["deps"] if not d.endswith(".py") and not in_cmd(d, cmd)]
    assert set(data) <= set(DATA_DEPS), f"{stage}: deps neither in its cmd nor known data: {set(data) - set(DATA_DEPS)}"
    read = set().union(*(params_read(p) for p in stage_code(stage) if p.parent.name == "stages"))
    for dep, key in DATA_DEPS.items():
        assert (dep in spec["deps"]) == (key in read), f"{stage}: reads {key} iff it depends on {dep}"


def test_pipeline_has_no_import_circles():
    """Every import of one pipeline module by another, at the top or inside a function, makes a graph without
    cycles: each module can be read, and changed, knowing only those below it."""
    graph = {}
    for path in (ROOT / "pipeline").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                names |= {a.name for a in node.names if (ROOT / "pipeline" / f"{a.name}.py").exists()}
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        graph[path.stem] = names - {path.stem}

    def circle_from(module, path):
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                return path[path.index(imported):] + [imported]
            found = circle_from(imported, path + [imported])
            if found:
                return found
        return None

    circles = [" -> ".join(c) for module in sorted(graph) if (c := circle_from(module, [module]))]
    assert not circles, f"import circles in pipeline/: {circles[0]}"
