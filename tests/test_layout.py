"""The package's layers: dependencies point one way (down), and a backwards import or a circle fails here.

The map (ARCHITECTURE.md, docs/development.md#layout): foundation < model < data < checkpoint < interop/inference < training
< tools and serving < entry scripts. A new module must be placed in LAYERS, so it cannot slip in unranked.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gpt"

# Lower number = lower layer. A module may import only modules of a lower layer; prefixes match whole packages ("gpt.infer" covers gpt.infer.engine, ...).
LAYERS = {
    "gpt.errors": 0,
    "gpt.outputs": 5,
    "gpt.config": 10,
    "gpt.entry": 25,
    "gpt.device": 20,
    "gpt.data.tokenizer": 20,
    "gpt.losses": 25,
    "gpt.data.jinja_template": 25,
    "gpt.data.tool_calls": 28,
    "gpt.data.chat_template": 30,
    "gpt.model": 30,
    "gpt.lora": 40,
    "gpt.data.files": 40,
    "gpt.data.bpe": 45,
    "gpt.data.canary": 40,
    "gpt.data.pii": 45,
    "gpt.data.batch": 35,
    "gpt.data.examples": 35,
    "gpt.data.token_files": 35,
    "gpt.data.training_order": 35,
    "gpt.data.messages": 42,
    "gpt.data.record_formats": 45,
    "gpt.data.corpus": 50,
    "gpt.data.finetune_data": 55,
    "gpt.data": 59,
    "gpt.checkpoint": 60,
    "gpt.hf_families": 65,
    "gpt.lora_peft": 66,
    "gpt.gguf_export": 68,
    "gpt.convert": 70,
    "gpt.pretrained": 72,
    "gpt.infer.sampling": 70,
    "gpt.infer.quantize": 70,
    "gpt.infer.compiled_decode": 72,
    "gpt.infer.weights": 75,
    "gpt.infer.constraints": 75,
    "gpt.infer.prefix_cache": 75,
    "gpt.infer.engine": 80,
    "gpt.infer.scoring": 80,
    "gpt.infer.speculative": 78,
    "gpt.infer.chat_session": 90,
    "gpt.infer.sample_cli": 95,
    "gpt.infer": 99,
    "gpt.train.optim": 100,
    "gpt.train.metrics": 100,
    "gpt.train.dist": 100,
    "gpt.lm_eval_model": 104,
    "gpt.tool_call_eval": 104,
    "gpt.eval": 105,
    "gpt.plot": 105,
    "gpt.train.loop": 110,
    "gpt.train.dpo": 115,
    "gpt.train.pretrain": 120,
    "gpt.train.sft": 120,
    "gpt.train": 129,
    "gpt.audit": 150,
    "gpt.redact": 150,
    "gpt.serve.protocol": 140,
    "gpt.serve.worker": 140,
    "gpt.serve.access": 142,
    "gpt.serve.responses": 143,
    "gpt.serve.app": 145,
    "gpt.serve.serve_cli": 150,
    "gpt.serve": 159,
}
TORCH_FREE = ("gpt.errors", "gpt.outputs", "gpt.config", "gpt.data.tokenizer", "gpt.data.jinja_template", "gpt.data.chat_template",
              "gpt.data.tool_calls",
              "gpt.data.messages", "gpt.data.record_formats")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def gpt_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from gpt.data import corpus` counts as gpt.data.corpus)."""
    return {n for n in imports(path) if n in known}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} is not placed in tests/test_layout.py LAYERS: give it a layer"
    return LAYERS[best]


def test_every_module_has_a_layer():
    for name in modules():
        if name != "gpt" and not name.endswith("__main__"):
            layer(name)


def test_imports_point_down():
    known = modules()
    for name, path in known.items():
        if name == "gpt" or name.endswith("__main__"):
            continue
        for dep in gpt_imports(path, known):
            if dep == "gpt" or name.startswith(dep + ".") or dep.startswith(name + "."):
                continue  # a package and its own modules
            assert layer(dep) < layer(name), f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"


def test_no_import_circles():
    known = modules()
    graph = {name: {d for d in gpt_imports(p, known) if d != name} for name, p in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1 and not (node.startswith(nxt + ".") or nxt.startswith(node + ".")):
                raise AssertionError("import circle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_foundations_know_nothing_of_torch():
    known = modules()
    for name in TORCH_FREE:
        assert not any(n.split(".")[0] == "torch" for n in imports(known[name])), name


def test_model_knows_nothing_of_training_files_or_tokens():
    known = modules()
    assert gpt_imports(known["gpt.model"], known) <= {"gpt.config", "gpt.losses"}


def test_no_module_imports_an_entry_script():
    for path in PKG.rglob("*.py"):
        assert not {"train", "sample", "finetune", "serve"} & imports(path), path.name


def test_entry_scripts_are_thin():
    for script in ("train.py", "sample.py", "finetune.py", "serve.py"):
        path = ROOT / script
        if path.exists():
            assert len(path.read_text().splitlines()) <= 40, f"{script} should only parse arguments and call gpt/"


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    """A function reads top to bottom on one screen; a longer one is split into named steps."""
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_every_module_file_name_is_unique_in_the_package():
    """One word, one thing: gpt/x/chat.py and gpt/y/chat.py would make 'chat' mean two things."""
    seen: dict[str, list[str]] = {}
    for path in PKG.rglob("*.py"):
        if path.name != "__init__.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {n: p for n, p in seen.items() if len(p) > 1}
