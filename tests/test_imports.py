"""The package's module graph: imports point down the layers (counting imports inside functions), no
import cycles, and every module imports on its own."""

import ast
import pathlib
import subprocess
import sys

import jaxllm

ROOT = pathlib.Path(jaxllm.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxllm modules it imports anywhere in its body (a package counts as imported with its
    submodules, since Python runs its __init__ first); typing-only imports under TYPE_CHECKING do not count."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not _type_checking_only(node, parents):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        deps = set()
        for target in targets:
            parts = target.split(".")
            deps |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# The layers, lowest first (a module belongs to the layer of its longest prefix here); every module not
# named is a command (load, plan, convert, evaluate, autotrain, push, prep/, cli), above them all. A module
# may import its own layer and those below, never one above.
LAYERS = (
    ("jaxllm", "jaxllm.config", "jaxllm.sharding", "jaxllm.tree", "jaxllm.atomic", "jaxllm.distributed"),
    ("jaxllm.models",),
    ("jaxllm.hf",),
    ("jaxllm.data",),
    ("jaxllm.train",),
)


def layer(module: str) -> int:
    found = len(LAYERS)
    for i, names in enumerate(LAYERS):
        if any(module == n or (n != "jaxllm" and module.startswith(n + ".")) for n in names):
            found = i
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a, deps in sorted(graph.items()) for b in sorted(deps) if layer(b) > layer(a)]


def test_imports_point_down_the_layers():
    up = upward_imports(import_graph())
    assert not up, "imports up the layers (models < hf < data < train < commands): " + "; ".join(up)


def test_the_layer_check_sees_an_upward_import():
    assert layer("jaxllm.tree") == 0 and layer("jaxllm.models.lora") == 1 and layer("jaxllm.train.loop") == 4
    assert layer("jaxllm.cli") == layer("jaxllm.prep.core") == layer("jaxllm.load") == 5
    graph = {"jaxllm.train.loop": {"jaxllm.plan", "jaxllm.data.lanes"}, "jaxllm.hf.peft": {"jaxllm.models.lora"}}
    assert upward_imports(graph) == ["jaxllm.train.loop -> jaxllm.plan"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "jaxllm.models.attention.module" in graph["jaxllm.models.decoder"]  # a top-level import
    assert "jaxllm.load" in graph["jaxllm.prep.curriculum"]  # an import inside a method


def test_every_module_imports_alone():
    """Each module imported into a fresh set of jaxllm modules (one interpreter, jaxllm's modules dropped
    between imports): none depends on another having been imported first."""
    script = (
        "import importlib, sys\n"
        f"names = {sorted(_modules())!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'jaxllm' or m.startswith('jaxllm.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
