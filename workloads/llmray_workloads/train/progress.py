"""Progress reporting: ``LLMRAY_PROGRESS {json}`` log lines plus ``<output>/.llmray/progress.json``.

Rank 0 prints; Ray forwards worker stdout to the job's driver log, which the operator tails and
parses with :func:`llmray.api.runtime.parse_progress`. The JSON file carries the same report for
readers that have the output volume but not the job log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from llmray.api.runtime import PROGRESS_MARKER, ProgressReport, format_progress

from .mfu import mfu

PROGRESS_DIR = ".llmray"
PROGRESS_FILE = "progress.json"


def progress_path(output_dir: str | Path) -> Path:
    """Where the latest report of a run is kept."""
    return Path(output_dir) / PROGRESS_DIR / PROGRESS_FILE


def write_progress(output_dir: str | Path, report: ProgressReport) -> None:
    """Write the report atomically (temp file + rename), so readers never see half a JSON."""
    path = progress_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.model_dump(by_alias=True, exclude_none=True), sort_keys=True))
    os.replace(tmp, path)


def read_progress(output_dir: str | Path) -> ProgressReport | None:
    """The last report written for this output, if any."""
    try:
        return ProgressReport.model_validate_json(progress_path(output_dir).read_text())
    except (OSError, ValueError):
        return None


def say(message: str, stream: TextIO | None = None) -> None:
    """Write one log line straight to the stream.

    Not ``print``: Ray Train V2 patches ``print`` in workers to go through its logger as well,
    which doubles every line in the job log.
    """
    out = stream or sys.stdout
    out.write(message if message.startswith(PROGRESS_MARKER) else f"llmray-train: {message}")
    out.write("\n")
    out.flush()


def emit(report: ProgressReport, output_dir: str | Path | None) -> None:
    """Print the progress line (flushed: Ray forwards stdout by line) and update the JSON file."""
    say(format_progress(report))
    if output_dir is not None:
        write_progress(output_dir, report)


@dataclass
class ProgressTracker:
    """Running numbers between reports; turns trainer state into :class:`ProgressReport`s."""

    output_dir: str | None
    started: float = field(default_factory=time.monotonic)
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    checkpoint_path: str | None = None
    checkpoint_step: int | None = None
    flops_per_token: float = 0.0
    """Model FLOPs per trained token (see :mod:`.mfu`); 0: unknown."""
    peak_flops: float | None = None
    """Peak FLOP/s of one accelerator at the run's precision; None: unknown (CPU)."""
    devices: int = 0
    """Accelerators of the whole run (all workers)."""
    on_report: Callable[[ProgressReport], None] | None = None
    """Called with every emitted report (rank 0 exports it as metrics)."""
    _last_time: float | None = None
    _last_tokens: int = 0
    _first_time: float | None = None
    _first_tokens: int = 0

    def start(self, total_steps: int, tokens_seen: int) -> None:
        """Mark the start of training in this attempt (throughput counts from here)."""
        self.total_steps = total_steps
        self._first_time = self._last_time = time.monotonic()
        self._first_tokens = self._last_tokens = tokens_seen

    def restore(self, log_history: list[dict[str, object]]) -> None:
        """Last known loss / eval loss / learning rate from a resumed trainer state."""
        for entry in log_history:
            for key, attr in (
                ("loss", "loss"),
                ("eval_loss", "eval_loss"),
                ("learning_rate", "learning_rate"),
            ):
                value = entry.get(key)
                if isinstance(value, int | float):
                    setattr(self, attr, float(value))

    def update_throughput(self, tokens_seen: int) -> None:
        """Tokens/s over all workers since the previous report."""
        now = time.monotonic()
        if self._last_time is not None and now > self._last_time and tokens_seen >= self._last_tokens:
            self.tokens_per_second = (tokens_seen - self._last_tokens) / (now - self._last_time)
        self._last_time, self._last_tokens = now, tokens_seen

    def average_throughput(self, tokens_seen: int) -> float | None:
        """Tokens/s over all workers for the whole attempt."""
        if self._first_time is None:
            return None
        elapsed = time.monotonic() - self._first_time
        return (tokens_seen - self._first_tokens) / elapsed if elapsed > 0 else None

    def mfu(self) -> float | None:
        """Model FLOPs utilisation at the latest throughput (None on CPU or unknown GPUs)."""
        return mfu(self.tokens_per_second, self.flops_per_token, self.peak_flops, self.devices)

    def report(self, step: int, epoch: float, state: str = "running", **extra: object) -> ProgressReport:
        """A report with the latest known numbers."""
        fields: dict[str, object] = {
            "step": step,
            "total_steps": self.total_steps,
            "epoch": round(epoch, 4),
            "loss": self.loss,
            "eval_loss": self.eval_loss,
            "learning_rate": self.learning_rate,
            "tokens_per_second": round(self.tokens_per_second, 1) if self.tokens_per_second else None,
            "mfu": None if (value := self.mfu()) is None else float(f"{value:.4g}"),
            "elapsed_seconds": round(time.monotonic() - self.started, 2),
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_step": self.checkpoint_step,
            "state": state,
            **extra,
        }
        return ProgressReport.model_validate(fields)

    def emit(self, step: int, epoch: float, state: str = "running", **extra: object) -> ProgressReport:
        """Build, print and persist a report."""
        report = self.report(step, epoch, state, **extra)
        emit(report, self.output_dir)
        if self.on_report is not None:
            self.on_report(report)
        return report
