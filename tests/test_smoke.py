"""End to end: `python train.py` on a tiny corpus trains, lowers the loss and writes a checkpoint."""

import json

from conftest import run_script, tiny_overrides


def test_train_script_lowers_loss_and_checkpoints(tmp_path, tiny_corpus):
    args = tiny_overrides(tmp_path, tiny_corpus, **{"train.max_iters": 40, "optim.lr": "3e-3"})
    proc = run_script("train.py", "configs/shakespeare.yaml", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    vals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.3
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "train_state.pt"):
        assert (out / "latest" / name).is_file()
    assert (out / "best" / "model.safetensors").is_file()
