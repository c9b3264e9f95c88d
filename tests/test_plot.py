"""python -m gpt.plot: a PNG for a finished run, a run in progress and several runs; clear errors."""

import json

import pytest
from conftest import tiny_overrides

from gpt import plot
from gpt.config import PretrainConfig, load_config
from gpt.train.pretrain import pretrain

image = pytest.importorskip("matplotlib.image")


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600 and pixels.std() > 0  # not blank


def write_metrics(folder, records, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    (folder / "config.yaml").write_text("model:\n  block_size: 32\n", encoding="utf-8")
    return folder


def fake_run(folder, steps=40, start=0, tail=""):
    records = [{"iter": start, "global_batch": 4, "world_size": 1}]
    for s in range(start + 5, steps + 1, 5):
        records.append({"iter": s, "loss": 3.0 / (1 + s / 10), "lr": 1e-3 * min(1, s / 10)})
        if s % 10 == 0:
            records.append({"iter": s, "val_loss": 3.2 / (1 + s / 12), "val_ppl": 1.0})
    return write_metrics(folder, records, tail)


def test_a_finished_run_writes_loss_png(tmp_path, tiny_corpus, capsys):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_corpus, **{
        "logging.plot": "true", "train.max_iters": 10, "train.eval_interval": 5, "train.dtype": "float32"}))
    pretrain(cfg)
    assert_png(tmp_path / "out" / "loss.png")
    assert f"loss curves: {tmp_path / 'out' / 'loss.png'}" in capsys.readouterr().out


def test_a_run_in_progress_with_a_half_written_line(tmp_path):
    run = fake_run(tmp_path / "run", tail='{"iter": 45, "lo')
    curves = plot.read_run(run)
    assert max(curves.points["loss"]) == 40 and curves.tokens_per_step == 4 * 32
    assert_png(plot.plot([run], tmp_path / "loss.png", log_scale=True))


def test_a_resumed_run_replaces_the_steps_it_ran_again(tmp_path):
    run = fake_run(tmp_path / "run", steps=40)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # resumed from step 20, now at 25
        f.write(json.dumps({"iter": 20, "global_batch": 4, "world_size": 1}) + "\n")
        f.write(json.dumps({"iter": 25, "loss": 9.0, "lr": 1e-3}) + "\n")
    curves = plot.read_run(run)
    assert max(curves.points["loss"]) == 25 and curves.points["loss"][25] == 9.0
    assert max(curves.points["val_loss"]) == 10  # step 20 and later were logged by the attempt that died


def test_several_runs_in_one_plot(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", steps=60)
    plot.main([str(a), str(b), "-o", str(tmp_path / "both.png")])
    assert_png(tmp_path / "both.png")
    assert "both.png" in capsys.readouterr().out


def test_without_out_the_png_goes_beside_the_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "out"
    a, b = fake_run(runs / "a"), fake_run(runs / "b")
    plot.main([str(a)])
    assert_png(a / "loss.png")
    plot.main(["out/a", "out/b"])
    assert_png(runs / "loss.png")
    assert not (tmp_path / "loss.png").exists()
    assert f"wrote {runs / 'loss.png'}" in capsys.readouterr().out


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "no metrics.jsonl" in err
    write_metrics(tmp_path / "starting", [{"iter": 0, "global_batch": 4}], tail="{")
    with pytest.raises(plot.PlotError, match="no loss values yet"):
        plot.read_run(tmp_path / "starting")
    assert not (tmp_path / "x.png").exists()


def test_a_failed_plot_never_fails_the_run(tmp_path):
    lines = []
    assert plot.plot_run(tmp_path, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: could not draw")
