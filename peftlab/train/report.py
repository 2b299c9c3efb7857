"""What a person sees of a run: a progress bar, log lines, metrics.jsonl, TensorBoard, a loss plot, a summary."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class Reporter:
    """Progress and metrics of one run; only the main process reports (``enabled=False`` elsewhere)."""

    def __init__(self, out_dir: Path, total_steps: int, console: Console, enabled: bool = True,
                 tensorboard: bool = True, resumed: bool = False):
        self.out_dir, self.total_steps, self.console, self.enabled = out_dir, total_steps, console, enabled
        self.metrics_path = out_dir / "metrics.jsonl"
        self._writer = None
        self._progress: Progress | None = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            self.metrics_path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass  # TensorBoard is optional

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
        self._task = self._progress.add_task("train", total=self.total_steps, completed=step, stats="")
        self._progress.start()

    def step(self, step: int, stats: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=_short(stats))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (and TensorBoard), and print it as a line."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._writer.add_scalar(key, value, record["step"])
        printer = self._progress.console if self._progress is not None else self.console
        printer.print(f"step {record['step']:>6}  " + _short({k: v for k, v in record.items()
                                                               if k not in ("step", "time")}), markup=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()

    def plot_loss(self) -> Path | None:
        """Write loss.png from metrics.jsonl (train loss, and eval loss where measured)."""
        if not self.enabled or not self.metrics_path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if not train and not evals:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def summary(self, rows: list[tuple[str, str]], before: dict[str, float] | None, after: dict[str, float] | None,
                ) -> None:
        """The final table: run facts, and eval metrics before vs after training side by side."""
        if not self.enabled:
            return
        facts = Table(title="run summary", show_header=False)
        for key, value in rows:
            facts.add_row(key, value)
        self.console.print(facts)
        if before or after:
            evals = Table(title="evaluation")
            for column in ("metric", "before training", "after training"):
                evals.add_column(column, justify="right" if column != "metric" else "left")
            for key in sorted(set(before or {}) | set(after or {})):
                evals.add_row(key, _fmt((before or {}).get(key)), _fmt((after or {}).get(key)))
            self.console.print(evals)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _short(stats: dict[str, Any]) -> str:
    parts = []
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if key == "lr" else f"{value:.4f}" if "loss" in key or "accuracy" in key \
                else f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.2f}"
        parts.append(f"{key} {value}")
    return "  ".join(parts)
