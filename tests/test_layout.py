"""The architecture as the import graph shows it: no import circle, no private name across modules, no
stage script importing another, and params read through their typed sections, not looked up by string."""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = sorted((ROOT / "fmvae").rglob("*.py"))
SCRIPTS = sorted((ROOT / "stages").glob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE + SCRIPTS}


def imports(path: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """Every project module `path` imports (module level, inside functions, under TYPE_CHECKING: all of
    them) and every private name it takes from one: (module, name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif path.parent.name == "stages" and node.module in {p.stem for p in SCRIPTS}:
                target = f"stages.{node.module}"  # a script's sibling, importable through sys.path
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # `from . import config`: the module itself
                    found.add(f"{target}.{alias.name}")
                    aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
                elif target in MODULES:
                    found.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((target, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):  # module._name
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append((aliases[node.value.id], node.attr))
    return found, private


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_a_private_import(tmp_path):
    """The checks themselves, on a known case: two modules importing each other (one inside a function,
    one under TYPE_CHECKING), one taking a private name from the other."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "one.py").write_text("def f():\n    from .two import _hidden\n")
    (tmp_path / "pkg" / "two.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import one\n"
                                             "x = one._secret\n")
    global ROOT, MODULES
    saved = ROOT, MODULES
    try:
        ROOT = tmp_path
        MODULES = {"pkg.one": tmp_path / "pkg/one.py", "pkg.two": tmp_path / "pkg/two.py"}
        graph = {name: imports(path) for name, path in MODULES.items()}
    finally:
        ROOT, MODULES = saved
    assert graph["pkg.one"] == ({"pkg.two"}, [("pkg.two", "_hidden")])
    assert graph["pkg.two"] == ({"pkg.one"}, [("pkg.one", "_secret")])
    assert circles({k: v[0] for k, v in graph.items()}) == [["pkg.one", "pkg.two"]]


def test_no_import_circle():
    assert circles({name: found for name, (found, _) in GRAPH.items()}) == []


def test_no_private_name_crosses_a_module():
    crossing = [(name, target, attr) for name, (_, private) in GRAPH.items() for target, attr in private
                if target != name]
    assert crossing == []


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.stem != "_common"], ids=lambda p: p.stem)
def test_no_stage_script_imports_another(script):
    """Each script is one stage or table; what two of them share lives in fmvae/ (or stages/_common.py,
    the scripts' paths and error handling)."""
    found, _ = GRAPH[module_name(script)]
    assert {m for m in found if m.startswith("stages.")} <= {"stages._common"}


def test_params_are_read_through_their_sections():
    """params.yaml is loaded once into typed sections (fmvae.params); no code looks a setting up by string."""
    hits = subprocess.run(["git", "grep", "-n", 'params\\["', "--", "fmvae", "stages"], cwd=ROOT,
                          capture_output=True, text=True).stdout.splitlines()
    assert [h for h in hits if not h.startswith("fmvae/params.py:")] == []


def test_the_readme_is_short_and_its_imports_work():
    """A newcomer's page: at most 220 lines, the rest in docs/ (every page it links exists), and the names it
    shows importable from the package."""
    import re
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
    from fmvae import FMVAE, FactorialMixturePrior, Hyperprior  # noqa: F401
    from fmvae.params import Params, load_params
    assert isinstance(load_params(ROOT / "params.yaml"), Params)


def test_the_core_depends_only_on_what_its_digest_covers():
    """fmvae/core (with data, params, io and provenance: the training sources that key every checkpoint)
    imports nothing from the rooms built on it (reporting, sweep, pack, tools): a change there can never
    move a trained number, which is why it re-keys none."""
    trained = ("fmvae.core", "fmvae.data", "fmvae.params", "fmvae.io", "fmvae.provenance")
    inside = lambda m: m == "fmvae" or any(m == t or m.startswith(t + ".") for t in trained)
    leaks = {name: sorted(m for m in found if not inside(m)) for name, (found, _) in GRAPH.items() if inside(name)}
    assert {name: out for name, out in leaks.items() if out} == {}
