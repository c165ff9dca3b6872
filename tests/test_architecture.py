"""The package's structure, checked from its source (see docs/architecture.md).

The import graph is built from every ``import`` statement in src/peftkit, wherever it is (module
level, inside functions, under ``TYPE_CHECKING``), not by importing anything. The rules:

* no import cycles among the package's modules;
* layers import only downwards (``RANKS``): errors; _io, registry, hub, assets; config; core; quant;
  checkpoint; model; auto, prompt; methods; the package and its compatibility modules; the toolkit
  (train, then cli). Modules of one layer may import each other (without cycles);
* the library never imports the toolkit (train/, cli/);
* nothing below the methods imports a method, and a method folder imports no other method folder;
* no module imports a private (``_name``) from another module of the package;
* no file over 600 lines, no function over 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "peftkit"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# (module name or package prefix, layer); the longest matching prefix decides
RANKS = {
    "peftkit.errors": 0, "peftkit.version": 0,
    "peftkit._io": 1, "peftkit.registry": 1, "peftkit.hub": 1, "peftkit.assets": 1, "peftkit.torch_utils": 1,
    "peftkit.as_peft": 1,
    "peftkit.config": 2, "peftkit.model_card": 2,
    "peftkit.core": 3,
    "peftkit.quant": 4,
    "peftkit.prune": 4.25,  # pruning (masks, structured): above quant, whose quantized layers it refuses
    "peftkit.checkpoint": 5, "peftkit.tuner": 5, "peftkit.status": 5,
    "peftkit.model_api": 5.5, "peftkit.adapter_io": 5.5,  # PeftModel's mixin and its folder reading
    "peftkit.model": 6, "peftkit.base_state": 6,
    "peftkit.auto": 7, "peftkit.prompt": 7,
    "peftkit.methods": 8,
    "peftkit": 9, "peftkit.inject": 9, "peftkit.prompt_model": 9,  # also hotswap, helpers, optimizers, PEFT paths
    "peftkit.train": 10, "peftkit.serve": 10.5,  # the toolkit: training, then the server (which reads models as train does)
    "peftkit.cli": 11,
    "peftkit.__main__": 12,
}
TOOLKIT = ("peftkit.train", "peftkit.serve", "peftkit.cli", "peftkit.__main__")
MODULES_FOUND = [".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in SRC.rglob("*.py")]
# modules that only re-export names for old imports (nothing in the library imports them)
COMPAT = {"peftkit.inject", "peftkit.prompt_model", "peftkit.methods.prompt", "peftkit.methods.selective",
          # Hugging Face PEFT's import paths (peft.tuners.lora, peft.utils, peft.mapping, ...)
          *(m for m in MODULES_FOUND if m.startswith(("peftkit.tuners", "peftkit.utils"))),
          "peftkit.peft_model", "peftkit.mapping", "peftkit.functional", "peftkit.mapping_func", "peftkit.mixed_model"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(name: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') of every import statement in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (base, alias.name))
    return [(m, n) for m, n in found if m == "peftkit" or m.startswith("peftkit.")]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for module, _ in _imports(name):
            while module not in MODULES:  # "peftkit.x.y" where y is a name in x
                module = module.rpartition(".")[0]
            if module != name:
                targets.add(module)
        graph[name] = targets
    return graph


GRAPH = _graph()


def _rank(name: str) -> int:
    best = max((p for p in RANKS if name == p or name.startswith(p + ".")), key=len)
    return RANKS[best]


def _group(name: str) -> str:
    """The layer entry a module belongs to (``peftkit.core.layer`` -> ``peftkit.core``)."""
    return max((p for p in RANKS if name == p or name.startswith(p + ".")), key=len)


def _method_folder(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] == "methods" and _is_package(".".join(parts[:3])):
        return parts[2]
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_kind_of_import():
    """The checker finds lazy and TYPE_CHECKING imports and resolves relative ones."""
    assert "peftkit.core.layer" in GRAPH["peftkit.core.targets"]
    assert "peftkit.config" in GRAPH["peftkit.core.layer"]  # under TYPE_CHECKING
    assert "peftkit.hub" in GRAPH["peftkit.model"]  # inside push_to_hub
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_layers_import_only_downwards():
    bad = [f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)})" for a, targets in GRAPH.items() for b in targets
           if _rank(b) > _rank(a) or (_rank(b) == _rank(a) and _group(a) != _group(b))]
    assert bad == []


def test_the_library_never_imports_the_toolkit():
    bad = [(a, b) for a, targets in GRAPH.items() for b in targets
           if not a.startswith(TOOLKIT) and b.startswith(TOOLKIT)]
    assert bad == []


def test_nothing_below_the_methods_imports_a_method():
    allowed = {"peftkit", *COMPAT}
    bad = [(a, b) for a, targets in GRAPH.items() for b in targets
           if b.startswith("peftkit.methods") and not a.startswith(("peftkit.methods", *TOOLKIT)) and a not in allowed]
    assert bad == []
    crossing = [(a, b) for a, targets in GRAPH.items() for b in targets
                if _method_folder(a) and _method_folder(b) and _method_folder(a) != _method_folder(b)]
    assert crossing == []


def test_no_module_imports_another_modules_privates():
    bad = [f"{name} imports {module}.{imported}" for name in MODULES for module, imported in _imports(name)
           if imported.startswith("_") and not imported.startswith("__") and module != name]
    assert bad == []


def test_file_and_function_sizes():
    long_files, long_functions = [], []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append((name, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", node.end_lineno - start + 1))
    assert long_files == [] and long_functions == []


def test_every_builtin_method_is_a_registered_folder():
    """One folder per method, each registering exactly its own record; the built-in list imports them."""
    import peftkit
    from peftkit.registry import all_methods

    folders = {p.name for p in (SRC / "methods").iterdir() if (p / "__init__.py").is_file()}
    registered = {m.config_cls.__module__.split(".")[2] for m in all_methods().values()}
    assert registered == folders
    assert {f"peftkit.methods.{f}" for f in folders} <= GRAPH["peftkit.methods"]
    assert all(m.config_cls.PEFT_TYPE is not None for m in all_methods().values())
    assert peftkit.LoraConfig is all_methods()["LORA"].config_cls


def test_old_import_paths_keep_working():
    """Modules people imported before the restructuring re-export what they held."""
    from peftkit import inject, prompt_model, quant
    from peftkit.methods import lora, prompt, selective

    assert inject.AdapterLayer.__module__ == "peftkit.core.layer"
    assert {"mixed_batch", "ModulesToSaveWrapper", "inject", "unload", "find_targets", "BASE_ADAPTER"} <= set(dir(inject))
    assert prompt_model.PromptLearningModel.__module__ == "peftkit.prompt.model"
    assert prompt_model.ENCODER_WEIGHTS_NAME == "peftkit_prompt_encoder.safetensors"
    assert {"NF4Linear", "Int8Linear", "quantize_model", "load_quantized", "dequantize_weight"} <= set(dir(quant))
    assert {"LoraConfig", "LoraLayer", "Linear", "Embedding", "ConvNd"} <= set(dir(lora))
    assert {"PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig", "p_tuning_v2_config"} <= set(dir(prompt))
    assert {"BitFitConfig", "PartialConfig", "CopyLayer"} <= set(dir(selective))


def test_modules_to_save_names_are_checked_alike_for_every_kind_of_model():
    """One check for layer and soft-prompt models: an unknown name is a TargetError, nothing changes."""
    import pytest

    from peftkit import LoraConfig, PromptTuningConfig, TargetError, get_peft_model
    from peftkit.core import AdapterLayer

    from .models import MLP, tiny_llama

    mlp = MLP()
    with pytest.raises(TargetError, match="modules_to_save"):
        get_peft_model(mlp, LoraConfig(target_modules=["lin0"], modules_to_save=["nope"]))
    assert not any(isinstance(m, AdapterLayer) for m in mlp.modules())
    llama = tiny_llama()
    with pytest.raises(TargetError, match="modules_to_save"):
        get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM", modules_to_save=["nope"]))
    assert not any(isinstance(m, AdapterLayer) for m in llama.modules())
