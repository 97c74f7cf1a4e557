"""Usage: ``python scripts/check_imports.py`` (exit 1 and a list of what is wrong; ``--graph`` prints the graph).

cnnlab's import rule: every import points down. The package's modules stand on floors (``FLOORS``,
lowest first); a module may import modules of its own floor or of the floors below, never above, and
no group of modules may import each other round in a circle. Every import counts: at the top of a
file, inside a function, and under ``if TYPE_CHECKING:`` (a circle that only type checkers see is still
a circle a reader has to hold in their head). A module that no floor names is an error too: a new
file says where it stands by being added here.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import sys
from pathlib import Path

PACKAGE = "cnnlab"
SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest first. Names are module paths below the package (``models.*`` matches every model family).
FLOORS: list[tuple[str, list[str]]] = [
    ("basics: errors, text, signals, the world of processes",
     ["errors", "safetext", "numtext", "console", "state", "stopping", "distributed", "cpus"]),
    ("what to train on: the typed config, the model registry and families, the data layer",
     ["models.library", "models.anatomy", "models.weights", "models.registry", "models.layers", "models.lenet", "models.vgg",
      "models.nin", "models.googlenet", "models.resnet", "models.alexnet", "models.densenet", "models.sequential", "config",
      "data", "data.*"]),
    ("building and describing: models, run-folder files, run identity, finished runs, figures",
     ["models", "models.build", "modelinfo", "results", "identity", "runs", "plots"]),
    ("training: runtime, threads, optimiser, steps, set-up, listeners",
     ["runtime", "threads", "optim", "selection", "averaging", "steps", "capture", "session", "listeners", "progress", "events",
      "loggers", "record"]),
    ("a run's life: fit, resume", ["engine"]),
    ("looking inside and comparing runs, finding a learning rate",
     ["dryrun", "lrfind", "evaluation", "visualize", "inference", "compare", "report", "d2l_replica"]),
    ("launching runs: a trial, sweeps, Ray, tuning, the bench", ["trial", "launch", "sweep", "cluster", "tune", "bench"]),
    ("the command line", ["cli", "entry", "__main__", ""]),
]


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package: its name below the package ('' for the package itself) -> file."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src / PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The package's modules that ``name`` imports, each with the first line that does."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [PACKAGE, *package[: len(package) - node.level + 1]]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from cnnlab.models import build` imports the module cnnlab.models.build
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}"[len(PACKAGE) + 1:] in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            target = target[len(PACKAGE) + 1:]
            while target and target not in known:  # `import cnnlab.models.registry.X` -> the module
                target = target.rpartition(".")[0]
            if target != name:
                found.setdefault(target, node.lineno)
    return found


def floor_of(name: str) -> int | None:
    for index, (_, patterns) in enumerate(FLOORS):
        if name in patterns:
            return index
    for index, (_, patterns) in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns if "*" in pattern):
            return index
    return None


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def problems(src: Path = SRC) -> list[str]:
    """What breaks the rule, one line each (empty: every import points down)."""
    known = modules(src)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    found = []
    for name in sorted(known):
        if floor_of(name) is None:
            found.append(f"{known[name]}: module {PACKAGE}.{name} stands on no floor; add it to FLOORS in {__file__}")
    for name, targets in sorted(graph.items()):
        here = floor_of(name)
        for target, line in sorted(targets.items()):
            there = floor_of(target)
            if here is not None and there is not None and there > here:
                found.append(f"{known[name]}:{line}: {name} (floor {here}) imports {target}, a floor up ({there})")
    for group in cycles(graph):
        found.append(f"import circle: {' <-> '.join(group)}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print each module's floor and imports")
    args = parser.parse_args()
    if args.graph:
        known = modules()
        for name, path in known.items():
            print(f"{floor_of(name)}  {name or PACKAGE} -> {' '.join(sorted(imports(name, path, known)))}")
    found = problems()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
