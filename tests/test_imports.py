"""The package's imports form a DAG, and reading a config imports neither jax, nor Grain, nor the trainer."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefopt_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function: `from a import b` is an
    import of `a.b` where that is a module, else of `a`."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    edges.add(target if target in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return [*stack[stack.index(m) :], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_package_imports_form_a_dag():
    graph = import_graph()
    assert "prefopt_jax.train.build" in graph["prefopt_jax.train.run"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and finds a cycle


def test_reading_a_config_imports_no_jax_grain_or_trainer():
    code = (
        "import sys; from prefopt_jax.config import load_config; "
        "load_config('configs/default.yaml', ['train.steps=3']); load_config('configs/kto_unpaired.yaml'); "
        "print(sorted(m for m in ('jax', 'grain', 'prefopt_jax.train', 'prefopt_jax.losses') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


# the entry points that resolve a config and pass its parts down; everything else under train/ takes typed
# sections (ModelSection, DataSection, TrainSection, ...) and the resolved Parts, never the whole Config
ENTRY_POINTS = {
    "build.resolve", "loop.train", "run.setup", "evaluation.evaluate_checkpoint", "export.export", "plan.plan",
    "reference_cache.precompute",
}  # fmt: skip


def test_below_the_entry_points_no_function_under_train_takes_a_config():
    """Every function under prefopt_jax/train/ with a parameter annotated `Config` or an unannotated `cfg`,
    and every class with a `Config` field (bar `Run`, the entry points' own product), is an entry point."""
    takers = set()
    for path in sorted((PACKAGE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                annotations = [(a.arg, ast.unparse(a.annotation) if a.annotation else None) for a in args]
                if any(kind == "Config" or (name, kind) == ("cfg", None) for name, kind in annotations):
                    takers.add(f"{path.stem}.{node.name}")
            elif isinstance(node, ast.ClassDef):  # a class holding a Config is a function taking one
                fields = [n for n in node.body if isinstance(n, ast.AnnAssign)]
                if any(ast.unparse(f.annotation) == "Config" for f in fields) and node.name != "Run":
                    takers.add(f"{path.stem}.{node.name}")
    assert takers == ENTRY_POINTS, sorted(takers ^ ENTRY_POINTS)
