"""Dependencies point one way; a module that grows a backwards import fails here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gpt"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "gpt":
                names.update(f"gpt.{a.name}" for a in node.names)
    return names


def gpt_imports(module: str) -> set[str]:
    return {n for n in imports(PKG / f"{module}.py") if n.startswith("gpt.")}


def test_config_and_tokenizer_know_nothing_of_torch():
    for module in ("config", "tokenizer"):
        assert not any(n.split(".")[0] == "torch" for n in imports(PKG / f"{module}.py")), module


def test_model_knows_nothing_of_training_files_or_tokens():
    assert gpt_imports("model") <= {"gpt.config"}


def test_checkpoint_and_data_do_not_know_the_training_loop():
    for module in ("checkpoint", "data", "generate", "tokenizer", "optim", "device"):
        assert not {"gpt.train", "gpt.sft"} & gpt_imports(module), module


def test_no_module_imports_an_entry_script():
    for path in PKG.glob("*.py"):
        assert not {"train", "sample", "finetune"} & imports(path), path.name


def test_entry_scripts_are_thin():
    for script in ("train.py", "sample.py", "finetune.py"):
        path = ROOT / script
        if path.exists():
            assert len(path.read_text().splitlines()) <= 40, f"{script} should only parse arguments and call gpt/"
