"""Where training metrics go: the console, metrics.jsonl in the output dir, and wandb if asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Rank 0 only: the other ranks get an instance with enabled=False that drops everything."""

    def __init__(self, *, out_dir: Path, enabled: bool, progress_total: int, start: int, show_progress: bool,
                 wandb_cfg: Any = None, run_config: dict | None = None):
        """Append to out_dir/metrics.jsonl; a progress bar from `start` to `progress_total` steps if
        show_progress (and a terminal); wandb if wandb_cfg.wandb, with run_config as the run's config."""
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        # disable=None: tqdm shows the bar only on a terminal, so logs and CI stay clean
        self.bar = tqdm(total=progress_total, initial=start, unit="it", dynamic_ncols=True, leave=False,
                        disable=None if (enabled and show_progress) else True)
        self.wandb = None
        if enabled and wandb_cfg is not None and wandb_cfg.wandb:
            import wandb  # optional dependency: pip install wandb

            self.wandb = wandb.init(project=wandb_cfg.wandb_project, name=wandb_cfg.wandb_run_name or None,
                                    mode=wandb_cfg.wandb_mode, config=run_config)

    def print(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line) if not self.bar.disable else print(line, flush=True)

    def record(self, **values: Any) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if k != "iter"}, step=values.get("iter"))

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
