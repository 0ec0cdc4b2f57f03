"""The layering of ARCHITECTURE.md: no dcm package imports one of a higher layer, and none import in a cycle.

Every import of a ``dcm`` module counts, lazy ones inside functions too (they run all the same). A *unit*
is a subpackage (``dcm.engine``) or a top-level module (``dcm.metrics``) of ``dcm``; imports inside one
unit are its own business.
"""

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, Set

DCM = Path(__file__).resolve().parents[1] / "dcm"

#: Lowest first. A unit may import units of its own layer or below, never above.
LAYERS = [
    # foundation: the vocabulary everything speaks (no models, no torch at import)
    {"dcm.errors", "dcm.prompts", "dcm.regions", "dcm.tables", "dcm.atomic", "dcm.safe_pickle", "dcm.config",
     "dcm.config_schema", "dcm.checks", "dcm.startup"},
    # the challenge's rules, case files and stored weights / networks
    {"dcm.protocol", "dcm.metrics", "dcm.data", "dcm.checkpoints", "dcm.models"},
    # one object's prediction in its own frame
    {"dcm.experts"},
    # routing, fusion, the clicks rule, the label writer, the interactive session
    {"dcm.engine"},
    # what runs the engine: the challenge runner and evaluator, the trainers, the nnInteractive server
    {"dcm.runner", "dcm.baselines", "dcm.evaluate", "dcm.training", "dcm.serve"},
    # commands, and the old module paths that forward to them
    {"dcm.cli", "dcm.__main__", "dcm.ablate", "dcm.demo", "dcm.segment", "dcm.info"},
]

#: The package root holds ``__version__`` and a lazy alias of ``dcm.engine.session.InteractiveSession``; it
#: is no layer of its own (``dcm.serve`` reads the version from it).
ROOT = "dcm"

#: Known upward imports, each with why it is still there. Keep this empty where possible.
ALLOWED_UPWARD: Set[tuple] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(DCM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _is_module(name: str) -> bool:
    return (DCM / f"{name}.py").is_file() or (DCM / name / "__init__.py").is_file()


def _imports() -> Dict[str, Set[str]]:
    """module -> the dcm modules it imports (anywhere in the file)."""
    out: Dict[str, Set[str]] = defaultdict(set)
    for path in sorted(DCM.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                # ``from dcm import tables`` imports the module dcm.tables (``__version__`` is the root's)
                targets = ([f"dcm.{a.name}" if _is_module(a.name) else base for a in node.names]
                           if base == "dcm" else [base])
            else:
                continue
            out[module].update(t for t in targets if t == "dcm" or t.startswith("dcm."))
    return out


def _layer_of() -> Dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _imports()} | {_unit(_module_name(p)) for p in DCM.rglob("*.py")}
    missing = sorted(units - set(_layer_of()) - {ROOT})
    assert not missing, f"place these in tests/test_layering.py LAYERS (and ARCHITECTURE.md): {missing}"


def test_no_import_goes_up_a_layer():
    layer = _layer_of()
    upward = []
    for module, targets in _imports().items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if ROOT in (src, dst) or src == dst or (src, target) in ALLOWED_UPWARD:
                continue
            if layer[dst] > layer[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports up a layer (see ARCHITECTURE.md):\n" + "\n".join(sorted(upward))


def test_allowed_upward_imports_still_exist():
    edges = {(_unit(m), t) for m, targets in _imports().items() for t in targets}
    stale = sorted(ALLOWED_UPWARD - edges)
    assert not stale, f"these exceptions are gone: remove them from ALLOWED_UPWARD: {stale}"


def test_no_import_cycles_between_units():
    graph: Dict[str, Set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        for target in targets:
            src, dst = _unit(module), _unit(target)
            if src != dst and ROOT not in (src, dst) and (src, target) not in ALLOWED_UPWARD:
                graph[src].add(dst)
    seen: Dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(unit: str, path: list) -> None:
        seen[unit] = 1
        for nxt in sorted(graph[unit]):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[unit] = 2

    for unit in sorted(graph):
        if unit not in seen:
            visit(unit, [unit])
    assert not cycles, "import cycles between dcm units:\n" + "\n".join(cycles)
