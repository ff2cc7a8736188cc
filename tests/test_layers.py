"""The house plan: aligndial's modules import only downward, and no import closes a circle.

Every `import aligndial...` in src/aligndial (top level or inside a function: a lazy import runs too,
just later) is an arrow. LAYERS below is the plan, stated once, ground floor first; ARCHITECTURE.md
describes it in words. A module may import its own floor's modules only where SAME_FLOOR_OK allows it;
it may import any lower floor. Run this file directly for the report:

    python tests/test_layers.py
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "aligndial"

# Ground floor first; a module is named by its dotted path under aligndial ("serve" is
# serve/__init__.py). A module may import any module on a lower floor, and one on its own floor
# unless that floor is marked independent (its modules are alternatives, and the floor above
# chooses between them). Circles are refused separately.
LAYERS: list[tuple[str, bool, list[str]]] = [
    ("maths, kernels and plain checks (no model code)", False, [
        "mixing", "kernels", "fewrows", "peft_dirs", "cliargs", "prompts", "report", "gguf", "serve.limits",
        "demo.task", "logs", "__init__"]),
    ("loading: models, tokenizers and their checks, adapters", False, ["loading", "vocab", "tiny", "adapter"]),
    ("generation with a mixed model", False, ["generation", "scoring"]),
    ("mixed models", True, ["pair", "dualpath", "lora_pair"]),
    ("picking a mixed model; exporting one", False, ["mixed", "interpolate", "vllm.export", "vllm.strength",
                                                      "vllm.models", "vllm"]),
    ("engines", False, ["engines", "continuous", "batch_cache", "vllm.run", "vllm.engine"]),
    ("uses: serve, evaluate, train, demo", False, [
        "metrics", "evaluate", "lmeval",
        "serve.errors", "serve.protocol", "serve.guards", "serve.app", "serve",
        "train", "train.data", "train.common", "train.sft", "train.dpo", "train.distill",
        "demo", "demo.measure", "demo.build", "demo.tour", "demo.reproduce", "demo.show"]),
    ("command line", False, ["cli", "clidocs"]),
]


def modules() -> dict[str, Path]:
    """Dotted name (without the package) -> file, for every module of the package."""
    root = SRC / PACKAGE
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that one file imports, wherever in the file the import stands."""
    def ours(name):
        if name == PACKAGE:
            return "__init__"
        return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else None

    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {ours(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and ours(node.module):
            # `from aligndial.serve import limits` imports the module serve.limits;
            # `from aligndial.pair import eos_ids` imports the module pair.
            base = ours(node.module)
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return out & known


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor when built from the ground: 0 imports nothing of ours, else 1 + its highest import."""
    memo: dict[str, int] = {}

    def floor(v, seen=()):
        if v in memo:
            return memo[v]
        if v in seen:  # a circle: count it once
            return 0
        memo[v] = value = 1 + max((floor(w, (*seen, v)) for w in edges[v]), default=-1)
        return value

    return {v: floor(v) for v in edges}


def layer_of() -> dict[str, int]:
    """Each module's floor. A module of a subpackage (serve/, vllm/, train/, demo/) that LAYERS
    does not name stands on the highest floor of its package's named modules, so a new file
    there is checked from the day it lands; a new top-level module must be named."""
    listed = {name: i for i, (_, _, names) in enumerate(LAYERS) for name in names}
    floors = dict(listed)
    for name in modules():
        package = name.rpartition(".")[0]
        if name not in listed and package:
            floors[name] = max(i for m, i in listed.items() if m == package or m.startswith(package + "."))
    return floors


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows to a higher floor of the plan, or across an independent floor."""
    layer = layer_of()
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer[b] > layer[a] or (layer[b] == layer[a] and LAYERS[layer[a]][1]))


def report() -> str:
    edges = graph()
    built = floors(edges)
    lines = [f"modules {len(edges)}, arrows {sum(map(len, edges.values()))}, "
             f"floors (longest import chain) {max(built.values()) + 1}, plan layers {len(LAYERS)}, "
             f"circles {len(circles(edges))}, arrows against the plan {len(upward(edges))}"]
    for component in circles(edges):
        lines.append("circle: " + " <-> ".join(component))
    for a, b in upward(edges):
        lines.append(f"against the plan: {a} ({layer_of()[a]}) -> {b} ({layer_of()[b]})")
    return "\n".join(lines)


def test_every_module_has_a_place_in_the_plan():
    placed = [name for _, _, names in LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a module is listed on two floors"
    unplaced = sorted(name for name in set(modules()) - set(placed) if "." not in name)
    assert unplaced == [], "new top-level modules need a floor in LAYERS"
    assert sorted(set(placed) - set(modules())) == [], "LAYERS names modules that no longer exist"


def test_no_import_circles():
    assert circles(graph()) == []


def test_no_import_runs_up_the_plan():
    assert upward(graph()) == []


# Checks that were repeated in several modules: each message (or definition) now stands in one file.
ONE_HOME = [
    "Can't provide both `--ref` and `--model`", "needs at least one `--aligned` model",
    "goes with `--ref`, not `--model`", "`--think-lam` needs a mix with a single aligned model",
    "`--num-beams` is not supported with `--engine vllm`", "`--think-lam` (λ changing inside a response) is not supported",
    "`--num-beams` and `--max-new-tokens` must be ≥ 1", "def export_n_aligned(", '.get("peft_type")',
    "def check_tokenizers(", "def few_rows_product(",
    "`--tensor-parallel-size` applies to `--engine vllm`", "`--enforce-eager` applies to `--engine vllm`",
    "`--device` does not apply to `--engine vllm`", "`--engine vllm` needs vLLM in this environment",
    "def model_dir(", "def engine_kwargs(", "def context_length(", "`--lam` needs a mix",
]


def test_each_check_has_one_home():
    sources = {path: path.read_text() for path in modules().values()}
    homes = {text: [str(p.relative_to(SRC)) for p, code in sources.items() for _ in range(code.count(text))]
             for text in ONE_HOME}
    assert {text: where for text, where in homes.items() if len(where) != 1} == {}


def _defined_in(tree: ast.AST) -> dict[str, list[str]]:
    """Class name -> its method names, for every class a module defines."""
    return {node.name: [f.name for f in node.body if isinstance(f, ast.FunctionDef)]
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _imported_names(path: Path) -> set[str]:
    """Every name a file imports from aligndial, wherever in the file the import stands."""
    return {alias.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE) for alias in node.names}


def test_one_engine_interface_for_every_verb():
    """generate, sweep and serve load through `load_engine`, and serving takes the loaded engine's
    `continuous()` shape: one class per engine answers `rows`, and the classes that take `submit`
    are built only by an engine's `continuous` (no second loader or export flow beside them)."""
    found = modules()
    trees = {name: ast.parse(path.read_text()) for name, path in found.items()}
    engines = {c: methods for tree in trees.values() for c, methods in _defined_in(tree).items()
               if {"rows", "scorer"} <= set(methods)}
    assert sorted(engines) == ["Engine", "TransformersEngine", "VLLMBatchEngine"]  # the protocol and one class each
    assert all("continuous" in methods for methods in engines.values())
    servers = {c for tree in trees.values() for c, methods in _defined_in(tree).items() if "submit" in methods}
    assert servers == {"HFEngine", "VLLMEngine"}
    builders = sorted({fn.name for tree in trees.values() for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                       for call in ast.walk(fn) if isinstance(call, ast.Call) and getattr(call.func, "id", None) in servers})
    assert builders == ["continuous"]
    serving = {n for name, path in found.items() if name == "serve" or name.startswith("serve.")
               for n in _imported_names(path)}
    assert "load_engine" in serving
    assert serving.isdisjoint({"load_mixed", "load_pair", "model_dir", "engine_kwargs", "context_length",
                               "TransformersEngine", "VLLMBatchEngine", "VLLMEngine", "check_installed"})
    loaders = {name for name, path in found.items() if "load_engine" in _imported_names(path)}
    assert loaders == {"cli", "serve"}  # generate and sweep (cli), serve (serve_from_args)


if __name__ == "__main__":
    print(report())
