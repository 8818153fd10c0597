"""Logging for people (stdlib ``logging``, one greppable line per event) and for machines (JSON lines).

- ``setup_logging``: logger ``vitfreeze``; rank 0 prints INFO to the console and appends to
  ``<output_dir>/cli_logs.txt``; other ranks only print warnings (MAE silences them by patching ``print``).
- ``SmoothedValue`` / ``format_eta``: the per-iteration progress line (MAE's ``MetricLogger``, trimmed).
- ``MetricWriter``: ``log(metrics, step)`` to TensorBoard at log steps; ``log_epoch(stats)`` appends one JSON
  line per epoch to ``<output_dir>/log.txt`` (MAE's format).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterator

LOGGER_NAME = "vitfreeze"


def setup_logging(output_dir: str | Path | None, rank: int = 0) -> logging.Logger:
    """Configure the ``vitfreeze`` logger for this process (idempotent: handlers are replaced)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = True  # lets pytest's caplog see records
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        from util.outputs import replace_link
        file_handler = logging.FileHandler(replace_link(Path(output_dir) / "cli_logs.txt"), mode="a")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


@contextlib.contextmanager
def log_prefix(prefix: str) -> Iterator[None]:
    """Every ``vitfreeze`` log line inside the block starts with ``prefix`` (e.g. ``[fold 2] `` for k-fold runs,
    so that a grep of ``cli_logs.txt`` tells the folds apart)."""
    logger = logging.getLogger(LOGGER_NAME)

    def add_prefix(record: logging.LogRecord) -> bool:
        record.msg = f"{prefix}{record.msg}"
        return True
    logger.addFilter(add_prefix)
    try:
        yield
    finally:
        logger.removeFilter(add_prefix)


class SmoothedValue:
    """Running window median/average plus the global average of a scalar series."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.values) / max(1, len(self.values))

    @property
    def global_avg(self) -> float:
        return self.total / max(1, self.count)


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinity (floats, also inside dicts, lists and tuples) replaced by None, so that
    it serialises to valid JSON (``json.dumps`` writes a bare ``NaN`` otherwise)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become null)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


class MetricWriter:
    """Metrics to TensorBoard (per log step) and ``log.txt`` (one JSON line per epoch); rank 0 only."""

    def __init__(self, output_dir: str | Path | None, log_dir: str | Path | None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.log_file = Path(output_dir) / "log.txt" if (enabled and output_dir) else None
        self._tb = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import costs ~1 s
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in metrics.items():
                if value is not None:
                    self._tb.add_scalar(key, value, step)

    def log_validation(self, metrics: dict[str, Any], epoch: int) -> None:
        """Validation metrics of an epoch to TensorBoard, x axis = epoch: ``acc1``, ``acc5`` and ``loss`` under
        MAE's names (``perf/test_acc1``, ``perf/test_acc5``, ``perf/test_loss``) so that MAE's dashboards and
        scripts read them, every numeric metric also as ``val/<name>``."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log({**{f"perf/test_{k}": numbers[k] for k in ("acc1", "acc5", "loss") if k in numbers},
                  **{f"val/{k}": v for k, v in numbers.items()}}, epoch)

    def log_epoch(self, stats: dict[str, Any]) -> None:
        """One ``log.txt`` line; its numbers also go to TensorBoard as ``epoch/<key>`` against the epoch (epoch time,
        images/s, the epoch's mean loss, validation metrics), when ``stats`` names its ``epoch``."""
        if self.log_file is not None:
            from util.outputs import append_text
            append_text(self.log_file, dumps_json(stats) + "\n")
        if self._tb is not None:
            epoch = stats.get("epoch")
            if isinstance(epoch, int):
                self.log({f"epoch/{k}": v for k, v in stats.items() if k != "epoch" and isinstance(v, (int, float))
                          and not isinstance(v, bool) and math.isfinite(v)}, epoch)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_results(output_dir: str | Path | None, results: dict[str, Any], name: str = "results.json") -> dict[str, Any]:
    """Write ``results`` as strict JSON (NaN -> null) to ``output_dir/name`` (None: not the main process, nothing
    written) and return them."""
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        from util.outputs import write_text
        write_text(Path(output_dir) / name, dumps_json(results, indent=2) + "\n")
    return results
