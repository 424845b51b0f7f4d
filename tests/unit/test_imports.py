"""The architecture, read from the imports of every module of flows/, stages/ and kernels/ (ast,
function-level imports included): no import cycles; Prefect, Hydra and MLflow only in flows/;
nothing of flows/ inside stages/ or kernels/, nothing of stages/ inside kernels/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "stages", "kernels")
ORCHESTRATOR_ONLY = ("prefect", "hydra", "omegaconf", "mlflow")


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(path: Path) -> list[str]:
    """Every module name an import statement of ``path`` names, at any depth of the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def edges() -> dict[str, set[str]]:
    mods = modules()
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name in imported(path):
            if name == "forge_kernels" or name.startswith("forge_kernels."):
                name = "kernels" + name[len("forge_kernels"):]   # kernels/ installs under that name
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and not m.startswith(name + "."):  # a package's __init__ is not a cycle
                out[m].add(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a path [a, b, ..., a], or [] when the graph is acyclic."""
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str]:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m] if m in path else [n, m, n]
            if m not in state:
                found = visit(m, path + [m])
                if found:
                    return found
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return []


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycle = find_cycle(edges())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_orchestrator_libraries_are_imported_only_in_flows():
    bad = [(m, name) for m, path in modules().items() if not m.startswith("flows")
           for name in imported(path) if name.split(".")[0] in ORCHESTRATOR_ONLY]
    assert not bad, f"Prefect/Hydra/MLflow imported outside flows/: {bad}"


def test_stages_and_kernels_never_import_upwards():
    bad = [(m, target) for m, targets in edges().items() for target in targets
           if (m.startswith(("stages", "kernels")) and target.startswith("flows"))
           or (m.startswith("kernels") and target.startswith("stages"))]
    assert not bad, f"imports upwards: {bad}"


def test_hydra_and_prefect_have_the_documented_homes():
    """flows/config.py is the only Hydra import, flows/pipeline.py and flows/schedule.py the only
    Prefect imports (as their docstrings say); flows/tracking/ the only MLflow imports."""
    homes = {"hydra": {"flows.config"}, "omegaconf": {"flows.config"},
             "prefect": {"flows.pipeline", "flows.schedule"},
             "mlflow": {m for m in modules() if m.startswith("flows.tracking")}}
    for lib, allowed in homes.items():
        users = {m for m, path in modules().items() for name in imported(path)
                 if name.split(".")[0] == lib}
        assert users <= allowed, f"{lib} imported by {sorted(users - allowed)}"


def test_flows_never_asks_which_kind_a_stage_is():
    """flows/ learns about a stage through the StageKind hooks only: it names no kind (no string
    equal to a kind's name, as in `node.kind == "pretrain"`) and imports no kind's module. The one
    family module it reads is the compute-plan arithmetic that ``StageKind.compute_plan`` returns."""
    from stages import KINDS
    allowed = {"stages", "stages.base", "stages.schema", "stages.specs", "stages.cluster",
               "stages.launch_spec", "stages.layout", "stages.training.compute"}
    named, imports = [], []
    for m, path in modules().items():
        if not m.startswith("flows"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in KINDS:
                named.append((m, node.value, node.lineno))
        imports += [(m, target) for target in edges()[m]
                    if target.startswith("stages") and target not in allowed]
    assert not named, f"flows/ names stage kinds: {named}"
    assert not imports, f"flows/ imports kind modules: {imports}"


def test_benchmarks_import_shared_helpers_not_test_modules():
    bad = [(path.name, name) for path in (ROOT / "benchmarks").glob("*.py")
           for name in imported(path) if name.startswith("tests")
           and not (name == "tests.support" or name.startswith("tests.support."))]
    assert not bad, f"benchmarks import test modules: {bad}"
