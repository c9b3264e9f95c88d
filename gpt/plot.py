"""Loss curves you can look at: train and validation loss, and the learning rate, of one or more runs.

    python -m gpt.plot out/shakespeare [out/other ...] [-o loss.png] [--log]

Reads each run's metrics.jsonl (a run still in progress is fine: a half-written last line is
skipped; after a resume the re-run steps replace the old ones). The top panel shows train and
validation loss against the optimizer step, with tokens seen on the top axis when the runs share
a batch shape; the best validation point of each run is starred. The bottom panel shows the
learning rate. matplotlib is imported here only, with the file-only Agg backend.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gpt import entry, outputs
from gpt.errors import UserError

SERIES = ("loss", "val_loss", "lr")
TOOL = "gpt.plot"  # named in every PNG it writes (PNG "Software"), so it knows its own for gpt/outputs.py's rule


class PlotError(UserError):
    """A folder that is not a run, or a run with nothing to draw yet."""


@dataclass
class RunCurves:
    name: str
    points: dict[str, dict[int, float]] = field(default_factory=lambda: {k: {} for k in SERIES})
    tokens_per_step: int | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps = sorted(self.points[key])
        return steps, [self.points[key][s] for s in steps]


def read_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The curves of one run from its metrics.jsonl (and its batch shape from config.yaml)."""
    folder = Path(run_dir)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{folder}: no metrics.jsonl here; pass a run's out_dir (where train.py or finetune.py wrote)")
    run = RunCurves(name or folder.resolve().name)
    global_batch = None
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half-written last line of a run in progress
        if not isinstance(rec, dict) or not isinstance(rec.get("iter"), int):
            continue
        step = rec["iter"]
        if "global_batch" in rec:  # a (re)start at `step`: what an earlier attempt logged after it is stale
            global_batch = rec["global_batch"]
            for points in run.points.values():
                for s in [s for s in points if s >= step]:
                    del points[s]
        for key in SERIES:
            if isinstance(rec.get(key), (int, float)):
                run.points[key][step] = float(rec[key])
    if not run.points["loss"] and not run.points["val_loss"]:
        raise PlotError(f"{metrics}: no loss values yet")
    block = _block_size(folder)
    run.tokens_per_step = global_batch * block if global_batch and block else None
    return run


def _block_size(folder: Path) -> int | None:
    """Tokens per sequence: sft.block_size when set, else model.block_size (None if unknown)."""
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        return int((cfg.get("sft") or {}).get("block_size") or cfg["model"]["block_size"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def plot(run_dirs: list[str | Path], out: str | Path, log_scale: bool = False) -> Path:
    """Draw the runs into one PNG at `out` (written atomically); returns its path. `out` follows
    gpt/outputs.py's rule: a new file, a PNG gpt.plot drew, or a run's loss.png."""
    names = [Path(d).resolve().name for d in run_dirs]
    runs = [read_run(d, name if names.count(name) == 1 else str(d)) for d, name in zip(run_dirs, names)]
    inputs = [Path(d) / "metrics.jsonl" for d in run_dirs]
    outputs.check_target(out, TOOL, inputs, recognise=is_plot)
    # matplotlib keeps a font cache in ~/.cache unless told otherwise: keep it beside the plot, in the user's folder
    os.environ.setdefault("MPLCONFIGDIR", str(Path(out).resolve().parent / ".matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[3, 1], constrained_layout=True)
    try:
        for i, run in enumerate(runs):
            _draw(ax, ax_lr, run, f"C{i}", prefix=f"{run.name} " if len(runs) > 1 else "")
        ax.set_ylabel("loss (nats per token)")
        ax.set_yscale("log" if log_scale else "linear")
        ax.set_title("Loss: " + (runs[0].name if len(runs) == 1 else ", ".join(r.name for r in runs)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        shared = {r.tokens_per_step for r in runs}
        if len(shared) == 1 and None not in shared:
            tps = shared.pop()
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
            top.set_xlabel(f"tokens seen ({tps:,} per step)")
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax_lr.set_xlabel("optimizer step")
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(alpha=0.3)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        draw = lambda f: fig.savefig(f, dpi=100, format="png", metadata={"Software": TOOL})  # noqa: E731
        return outputs.replace_file(out, TOOL, draw, inputs, recognise=is_plot)
    finally:
        plt.close(fig)


def is_plot(path: Path) -> bool:
    """A PNG gpt.plot drew (it names itself in it), or a run's loss.png (drawn before it did)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if not head.startswith(b"\x89PNG"):
        return False
    return b"Software\x00" + TOOL.encode() in head or (path.name == "loss.png" and outputs.is_run_folder(path.parent))


def _draw(ax, ax_lr, run: RunCurves, color: str, prefix: str) -> None:
    steps, loss = run.series("loss")
    if steps:
        ax.plot(steps, loss, color=color, alpha=0.55, lw=1.2, label=f"{prefix}train")
    steps, val = run.series("val_loss")
    if steps:
        ax.plot(steps, val, color=color, lw=2.0, marker="o", ms=4, label=f"{prefix}validation")
        k = min(range(len(val)), key=val.__getitem__)
        ax.plot(steps[k], val[k], marker="*", ms=16, color=color, mec="black", zorder=5, ls="none",
                label=f"{prefix}best validation")
        ax.annotate(f"{val[k]:.3f} @ {steps[k]}", (steps[k], val[k]), textcoords="offset points", xytext=(-10, -16),
                    ha="right", fontsize=8, color=color)
    steps, lr = run.series("lr")
    if steps:
        ax_lr.plot(steps, lr, color=color, lw=1.5)


def plot_run(out_dir: str | Path, log=print) -> Path | None:
    """out_dir/loss.png when a run ends; a failure is one warning line, never a failed run."""
    try:
        path = plot([out_dir], Path(out_dir) / "loss.png")
    except Exception as e:  # a missing matplotlib, a full disk, ...: the run's results are already saved
        log(f"warning: could not draw {Path(out_dir) / 'loss.png'} ({type(e).__name__}: {e})")
        return None
    log(f"loss curves: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run folders (each with a metrics.jsonl)")
    p.add_argument("-o", "--out", default=None,
                   help="PNG to write (default: RUN/loss.png for one run; loss.png in the runs' common folder for several)")
    p.add_argument("--log", action="store_true", help="log-scale loss axis")
    args = p.parse_args(argv)
    out = args.out or default_out(args.run_dirs)
    entry.main(lambda: print(f"wrote {plot(args.run_dirs, out, args.log)}"))


def default_out(run_dirs: list[str]) -> Path:
    """Beside the runs, never the current folder: RUN/loss.png, or loss.png in the folder that holds them all."""
    return Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs])) / "loss.png"


if __name__ == "__main__":
    main()
