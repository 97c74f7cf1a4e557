"""Usage: ``result = run_trial(cfg, events)``: one experiment as a function that returns its result.

A trial is ``cnnlab run CONFIG --resume auto`` as a function: it continues the newest unfinished
run of exactly this config or starts one, never raises for the ways a run can end, and returns a
``TrialResult`` (status, run folder, summary, metrics) that launchers and Ray Tune use as data.
``events`` (any ``Listener``, e.g. an ``EventWriter``) hears the run's progress as it happens.
A launcher that runs the trial in another process rebuilds the same result from its events and
exit code with ``TrialRecorder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.config import Config
from cnnlab.errors import TrainingError, UserError
from cnnlab.listeners import FanOut, Listener
from cnnlab.results import RunSummary, read_metrics_csv, read_summary
from cnnlab.stopping import HANDLED, Interrupted, Pruned, signal_name


@dataclass
class TrialResult:
    status: str  # completed, failed, interrupted, or pruned (stopped early by a tuner)
    run_dir: Path | None = None  # None when the trial failed before its folder existed (bad config, bad data)
    summary: RunSummary | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    exit_code: int = 0  # what `cnnlab run` exits with for this ending

    @property
    def epochs_done(self) -> int:
        return len(self.metrics)


class TrialRecorder(Listener):
    """Listens to a trial and keeps what its result needs: the run folder and the final summary."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.error = ""

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)

    def on_event(self, event: dict[str, Any]) -> None:
        """The same, from an event read back from another process (which names its folder absolutely)."""
        kind = event.get("event")
        run_dir = event.get("run_dir")
        if kind == "run_start" and isinstance(run_dir, str) and Path(run_dir).is_absolute():
            self.run_dir = Path(run_dir)
        elif kind == "error":
            self.error = str(event.get("message", ""))

    def result(self, exit_code: int) -> TrialResult:
        """The trial's result from what was heard and how its process ended (negative: killed by a signal)."""
        summary, metrics, problem = self._read_back()
        signum = -exit_code if exit_code < 0 else exit_code - 128
        if exit_code == 0 and summary is not None and summary.status in ("completed", "pruned"):
            status, error = summary.status, ""
        elif signum in HANDLED:
            status, error = "interrupted", f"interrupted by {signal_name(signum)}"
        else:
            status = "failed"
            error = self.error or (summary.error if summary is not None and summary.error else "") or problem or \
                (f"killed by {signal_name(-exit_code)}" if exit_code < 0 else f"exit code {exit_code}")
        return TrialResult(status, self.run_dir, summary, metrics, error, exit_code)

    def _read_back(self) -> tuple[RunSummary | None, list[dict[str, Any]], str]:
        if self.run_dir is None or not (self.run_dir / "summary.json").is_file():
            return None, [], ""
        try:
            summary = read_summary(self.run_dir / "summary.json")
            metrics = read_metrics_csv(self.run_dir / "metrics.csv") if (self.run_dir / "metrics.csv").is_file() else []
            return summary, metrics, ""
        except UserError as err:
            return None, [], str(err)


def run_trial(cfg: Config, events: Listener | None = None) -> TrialResult:
    """Run (or continue) the experiment ``cfg`` in this process and return how it ended."""
    from cnnlab.engine import run_or_resume

    recorder = TrialRecorder()
    try:
        run_or_resume(cfg, reporter=FanOut(recorder, events))
        code = 0
    except UserError as err:
        recorder.error, code = str(err), err.exit_code
    except TrainingError as err:
        recorder.error, code = str(err), err.exit_code
    except Interrupted as err:
        code = err.exit_code
    except Pruned:
        code = 0
    except KeyboardInterrupt:
        code = 130
    except SystemExit as err:  # only user code (a model) raises this inside cnnlab
        recorder.error, code = f"the model's code called sys.exit({err.code!r})", 1
    except Exception as err:  # a failure in the model's own code, recorded in its summary
        recorder.error, code = f"{type(err).__name__}: {err}", 1
    return recorder.result(code)
