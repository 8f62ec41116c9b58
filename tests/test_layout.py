"""The package's structure holds: no import cycle inside rshard_hpc (counting imports inside functions too), and
model math (models/) and array operations (ops/) never import anything that imports MPI."""
import ast
from pathlib import Path

import rshard_hpc

PACKAGE = Path(rshard_hpc.__file__).resolve().parent
MPI_FREE = ("rshard_hpc.models", "rshard_hpc.ops")  # and everything they import


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """{module: set of modules it imports}, inside the package (module-level and lazy imports alike);
    external imports are kept by their top name (e.g. 'mpi4py')."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import sub` depends on the module sub; `from mod import name` on mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules:
                    found.add(target)
                elif not target.startswith("rshard_hpc"):
                    found.add(target.split(".")[0])
        found.discard(name)
        graph[name] = {m for m in found if not name.startswith(m + ".")}  # a module's own packages load first
    return graph


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def _reach(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    assert _cycle(import_graph()) is None, f"import cycle: {' -> '.join(_cycle(import_graph()))}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_model_math_and_ops_never_reach_mpi():
    graph = import_graph()
    for name in graph:
        if name.startswith(MPI_FREE):
            reached = _reach(graph, name)
            assert "mpi4py" not in reached, f"{name} reaches mpi4py"
            assert not any(m.startswith(("rshard_hpc.dist", "rshard_hpc.run", "rshard_hpc.engine")) for m in reached), \
                f"{name} imports {sorted(m for m in reached if m.startswith('rshard_hpc.'))}"


def test_every_folder_is_a_package_with_a_docstring():
    for init in [PACKAGE / "__init__.py", *PACKAGE.glob("*/__init__.py")]:
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says nothing of its folder"


def test_the_checkouts_kernels_folder_hides_no_top_level_kernels_package():
    """From the checkout's root (where `python -m pytest` puts it on sys.path) `import kernels` must not find
    kernels/ as a regular package: transformers imports the `kernels` distribution when it is installed."""
    import subprocess
    import sys

    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           cwd=PACKAGE.parent)
    assert found.returncode == 0, found.stderr
    assert not found.stdout.strip().startswith(str(PACKAGE.parent / "kernels")), found.stdout


# What a CPU rank imports to run a job stays lean: 13 ranks on 2 cores pay every module 13 times at start-up
# (issue 13). None of these is needed there: the GPU transports and their probes, the profiler, numpy.ma (which a
# plain np.unique loads: plan.views.sorted_unique instead), and h5py (loaded where a file is opened: the client's
# results, CompNode 0's weights; the CompNodes that receive the weights never need it).
NOT_AT_START = ("numpy.ma", "cProfile", "pstats", "subprocess", "rshard_hpc.dist.transport_choice",
                "rshard_hpc.dist.cuda_aware", "rshard_hpc.dist.ipc_signal", "cupy", "torch", "h5py")
JOB_MODULES = ("rshard_hpc.cli", "rshard_hpc.run.job", "rshard_hpc.engine.workers", "rshard_hpc.engine.attn_worker",
               "rshard_hpc.engine.client", "rshard_hpc.models", "rshard_hpc.models.bert", "rshard_hpc.models.llama",
               "rshard_hpc.plan.ledger")


def test_a_cpu_rank_imports_nothing_it_does_not_use():
    import subprocess
    import sys

    code = (f"import sys\nfor m in {JOB_MODULES!r}: __import__(m)\n"
            f"print(' '.join(m for m in {NOT_AT_START!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"imported at a CPU rank's start: {loaded}"


def test_no_plain_np_unique_in_the_package():
    """np.unique without return_* arguments imports numpy.ma (NumPy 2.x, ~12 ms a rank) and hashes slowly."""
    plain = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "unique"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "xp")
                    and not any((k.arg or "").startswith("return_") for k in node.keywords)):
                plain.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert plain == [], f"use plan.views.sorted_unique: {plain}"
