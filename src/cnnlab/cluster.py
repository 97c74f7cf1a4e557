"""Usage: ``cnnlab sweep configs/kernels/ --launcher ray [--address auto]``: trials as Ray tasks.

Ray (an optional extra: ``pip install 'cnnlab[ray]'``) runs a sweep's trials, and ``cnnlab tune``'s,
where there is room for them: on this machine through an embedded Ray instance when no address is
given, or on a running cluster (``--address auto`` on one of its nodes, ``ray://head:10001`` from
outside). Each trial is one task running ``run_trial`` with the resources it asks for
(``--gpus-per-trial``, ``--cpus-per-trial``); its events come back through a Ray queue.

Run folders must reach the machine that started the sweep. When ``output.dir`` is on storage every
node shares (NFS and the like), trials write there directly: the launcher leaves a token file in the
sweep folder, and a task that can read it back knows that it shares the driver's storage. A task
that cannot trains in a temporary folder on its node and sends the finished run folder back as a
tar archive, which the driver checks and unpacks where a local run would be.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnlab.config import validate
from cnnlab.cpus import usable_cpus
from cnnlab.errors import UserError
from cnnlab.events import EventWriter
from cnnlab.launch import Launcher, Trial
from cnnlab.results import RunDir, atomic_write_text, read_summary
from cnnlab.stopping import signal_name
from cnnlab.trial import TrialRecorder, TrialResult, run_trial

INSTALL = "pip install 'cnnlab[ray]'"
MAX_RUN_ARCHIVE = 2 << 30  # a shipped run folder is checkpoints and a few plots; refuse anything near this
SKIPPED_FILES = (".lock",)
# How long a cancelled trial may take to checkpoint, pack its folder and reply: only a hung trial takes it all
# (a loaded machine may take a minute); the trial is then recorded from the events it sent.
CANCEL_GRACE_SECONDS = 300


def require_ray(feature: str) -> Any:
    """``import ray``, or a ``UserError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"{feature} needs Ray, which is not installed; install it with: {INSTALL}") from None
    return ray


def connect(address: str, feature: str) -> None:
    """Connect to the Ray cluster at ``address`` (an embedded instance's, or one the user named)."""
    ray = require_ray(feature)
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address != "auto" and not address.startswith("ray://"):
        # Ray reads the cluster's token (~/.ray/auth_token) for `auto` only; a HOST:PORT address (the
        # embedded instance's too, which Ray starts with token authentication) needs it too.
        with contextlib.suppress(Exception):
            from ray._private.authentication import authentication_token_setup as auth

            said = logging.getLogger(auth.__name__)
            level = said.level
            said.setLevel(logging.ERROR)  # not its warning that token authentication is on: that is as it should be
            try:
                auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            finally:
                said.setLevel(level)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"could not connect to the Ray cluster at {address}: {err}; is it running (`ray status`)? "
                        "Give --address auto on one of its nodes or ray://HEAD:10001") from None


# The embedded Ray instance's head: a process of its own (see local_ray) that only imports Ray. Always a
# new instance ("local"), never the cluster someone's `ray start` left on this machine (that is --address auto).
HEAD_SCRIPT = """
import logging, sys
import ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False, logging_level=logging.ERROR,
         log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until cnnlab closes this pipe, or dies
ray.shutdown()
"""
HEAD_START_SECONDS = 300  # how long a loaded machine may take to start Ray
HEAD_STOP_SECONDS = 60


@contextlib.contextmanager
def local_ray(feature: str) -> Iterator[str]:
    """An embedded Ray instance on this machine for the duration of the block; yields its address.

    Ray's processes are started by a helper process in a session of its own, so that a SIGTERM or
    SIGHUP to cnnlab's process group (``timeout``, a closed terminal, a batch system) or a terminal's
    Ctrl-C reaches cnnlab alone: it stops its trials in order, then shuts Ray down. (Started by
    ``ray.init`` in this process, Ray's processes share its group and die first, trials and all.)
    The helper shuts Ray down when cnnlab closes its stdin, or dies and the pipe closes.
    """
    log = tempfile.TemporaryFile()  # the helper's stderr: why Ray did not start, if it did not
    try:
        # The CPUs this process may use (affinity mask, cgroup quota), not the host's: Ray would count those.
        head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT, str(usable_cpus().count)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    except OSError as err:
        log.close()
        raise UserError(f"could not start a local Ray instance: {err}") from None
    try:
        address = _first_line(head.stdout, HEAD_START_SECONDS)
        if not address:
            log.seek(0)
            problem = log.read().decode(errors="replace").strip().splitlines()
            raise UserError("could not start a local Ray instance" + (f": {problem[-1]}" if problem else ""))
        yield address
    finally:
        _stop_head(head)
        log.close()


def _first_line(stream: Any, timeout: float) -> str:
    """The first line of ``stream``, stripped: '' at its end, or when none comes within ``timeout`` seconds."""
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0].decode(errors="replace").strip() if lines else ""


def _stop_head(head: subprocess.Popen) -> None:
    """Close the helper's stdin (it shuts Ray down and exits); end its whole session if it does not."""
    with contextlib.suppress(OSError):
        head.stdin.close()
    try:
        head.wait(timeout=HEAD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    finally:
        head.stdout.close()


@contextlib.contextmanager
def ray_session(address: str | None, feature: str) -> Iterator[None]:
    """Ray connected for the duration of the block: to the cluster at ``address``, or to an embedded
    instance started for it (None). Disconnected after, the embedded instance shut down. Nothing
    phones home: Ray's usage statistics stay off unless the user turns them on."""
    ray = require_ray(feature)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        connect(address or stack.enter_context(local_ray(feature)), feature)
        try:
            yield
        finally:
            ray.shutdown()


def cluster_capacity() -> tuple[float, float]:
    """(CPUs, GPUs) of the largest node: what one trial can be given at most."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    return cpus, gpus


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float | None, jobs: int | None,
                    trials: int) -> tuple[float, float, int]:
    """(CPUs, GPUs) per trial and how many run at once, checked against the cluster: a trial that
    asks for more than any node has would wait for ever, so it is refused here instead."""
    import ray

    total = ray.cluster_resources()
    node_cpus, node_gpus = cluster_capacity()
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if node_gpus >= 1 else 0.0)
    if jobs is None:  # as many as the cluster holds at once
        jobs = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // (cpus_per_trial or 1))
        jobs = max(1, min(jobs, trials))
    cpus = cpus_per_trial if cpus_per_trial is not None else (
        max(1.0, node_cpus // max(node_gpus, 1)) if gpus else max(1.0, total.get("CPU", 1) // jobs))
    if gpus > node_gpus:
        raise UserError(f"--gpus-per-trial {gpus:g}: no node of this Ray cluster has that many GPUs (the largest has "
                        f"{node_gpus:g}); ask for fewer, or --gpus-per-trial 0 to train on CPUs")
    if cpus > node_cpus:
        raise UserError(f"--cpus-per-trial {cpus:g}: no node of this Ray cluster has that many CPUs (the largest has "
                        f"{node_cpus:g}); ask for fewer")
    return cpus, gpus, jobs


# ---------------------------------------------------------------------------------------------
# Run folders as bytes


def pack_run(run_dir: Path) -> bytes:
    """A finished run folder as a gzipped tar of its regular files (the lock and any link left out)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(run_dir.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.name in SKIPPED_FILES:
                continue
            archive.add(path, arcname=str(path.relative_to(run_dir)), recursive=False)
    return buffer.getvalue()


def unpack_run(payload: bytes, run_dir: Path) -> None:
    """Unpack a shipped run folder into ``run_dir`` (which must not exist yet). The archive comes
    from another machine: only plain files and folders inside ``run_dir`` are accepted, of bounded
    size, and nothing is left half-written on a refusal."""
    if len(payload) > MAX_RUN_ARCHIVE:
        raise UserError(f"the run folder shipped back for {run_dir} is {len(payload)} bytes; refusing it")
    if run_dir.exists():
        raise UserError(f"{run_dir} already exists; not overwriting it with a shipped copy")
    try:  # unpacked beside its place (same file system: one rename), under a name no run folder has
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".incoming-{run_dir.name}.", dir=run_dir.parent))
    except OSError as err:
        raise UserError(f"cannot unpack the run folder shipped back for {run_dir}: {err}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:
            members = archive.getmembers()
            total = 0
            for member in members:
                parts = Path(member.name).parts
                if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or ".." in parts:
                    raise UserError(f"the run folder shipped back for {run_dir} holds {member.name!r}, which is not a "
                                    "plain file inside the folder; refusing it")
                total += member.size
            if total > MAX_RUN_ARCHIVE:
                raise UserError(f"the run folder shipped back for {run_dir} unpacks to {total} bytes; refusing it")
            archive.extractall(staging, filter="data")
        staging.rename(run_dir)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"the run folder shipped back for {run_dir} cannot be unpacked: {err}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One trial as a Ray task


def ray_trial(cfg_values: dict[str, Any], key: str, queue: Any, marker: str, token: str, cpus: float,
              ship: bool | None) -> dict[str, Any]:
    """Runs on a Ray worker: the trial, then where its folder is (or the folder itself, as bytes)."""
    from cnnlab.threads import take_share

    cfg = validate(cfg_values, "the sweep's trial config", trust_code=True)  # the sweep's own, already checked
    if not isinstance(cfg.train.threads, int):
        take_share(int(cpus))
    marker_path = Path(marker)
    shared = marker_path.is_file() and marker_path.read_text(encoding="utf-8") == token
    ship = not shared if ship is None else ship
    scratch = None
    if ship:  # train in a folder of this node's own; the driver gets the finished folder as bytes
        scratch = Path(tempfile.mkdtemp(prefix="cnnlab-trial-"))
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": scratch})})

    def send(event: dict[str, Any]) -> None:
        if queue is None:
            return
        from ray.exceptions import TaskCancelledError

        try:
            queue.put((key, event))
        except TaskCancelledError:  # a put in flight as this task was cancelled: the stop is the signal's
            queue.put((key, event))  # to say (the run records it at its next batch); the event still goes

    try:
        result = run_trial(cfg, EventWriter(sink=send))
        payload = pack_run(result.run_dir) if ship and result.run_dir is not None and result.run_dir.is_dir() else None
        relative = result.run_dir.relative_to(scratch) if payload is not None else None
        reply = {"status": result.status, "run_dir": str(result.run_dir) if result.run_dir else None,
                 "relative": str(relative) if relative else None, "payload": payload, "error": result.error,
                 "exit_code": result.exit_code}
        if result.status == "interrupted":  # cancelled: Ray drops a cancelled task's return value, so the
            send({"event": "reply", "reply": reply})  # driver gets the stopped run (and its folder) this way
        return reply
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def receive(reply: dict[str, Any], output_dir: Path) -> TrialResult:
    """The driver's side: a task's reply as a ``TrialResult``, a shipped folder unpacked under ``output_dir``."""
    recorder = TrialRecorder()
    recorder.error = str(reply.get("error") or "")
    run_dir = reply.get("run_dir")
    if reply.get("payload") is not None and reply.get("relative"):
        relative = Path(reply["relative"])
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 2:
            raise UserError(f"a Ray task named its run folder {relative}; expected <name>/<run id>")
        target = Path(output_dir) / relative
        unpack_run(reply["payload"], target)
        summary_path = target / "summary.json"
        if summary_path.is_file():  # the folder now lives here: say so where it says where it is
            summary = read_summary(summary_path)
            if getattr(summary, "run_dir", None):  # written by completed runs
                summary.run_dir = str(target)
                RunDir(target).write_summary(summary)
        run_dir = str(target)
    if run_dir:
        recorder.run_dir = Path(run_dir)
    code = reply.get("exit_code")
    return recorder.result(code if isinstance(code, int) else 1)


class EventRelay:
    """One Ray queue for every trial's events, read by one driver thread that hands each event to
    the listener of its trial."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.listeners: dict[str, Any] = {}
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="cnnlab-ray-events", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self.closed.is_set():
            try:
                key, event = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shut down): no more events
                return
            listener = self.listeners.get(key)
            if listener is not None and isinstance(event, dict):
                listener(event)

    def new_key(self, listener: Any) -> str:
        key = secrets.token_hex(8)
        self.listeners[key] = listener
        return key

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=2)
        try:
            self.queue.shutdown()
        except Exception:
            pass


class RayLauncher(Launcher):
    """Each trial is a Ray task (``ray_trial``) with ``cpus`` and ``gpus``; ``stop`` cancels them (the
    training loop takes the cancellation as Ctrl-C, records it and can be resumed)."""

    name = "ray"

    def __init__(self, sweep_dir: Path, output_dir: Path, cpus: float, gpus: float, ship: bool | None = None) -> None:
        self.sweep_dir = sweep_dir
        self.output_dir = output_dir
        self.cpus, self.gpus, self.ship = cpus, gpus, ship
        self.refs: dict[str, Any] = {}
        self.stop_signal: int | None = None
        self.token = secrets.token_hex(16)
        self.marker = (sweep_dir / ".shared-storage").resolve()

    def __enter__(self) -> RayLauncher:
        import ray

        atomic_write_text(self.marker, self.token)
        self.remote = ray.remote(ray_trial)
        self.relay = EventRelay()
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay.close()
        self.marker.unlink(missing_ok=True)

    def stop(self, signum: int) -> None:
        import ray

        self.stop_signal = self.stop_signal or signum
        for ref in list(self.refs.values()):
            ray.cancel(ref, recursive=False)  # not the trial's own event puts in flight: it must still report

    def launch(self, trial: Trial, config_path: Path, slot: int, on_event: Any) -> TrialResult:
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        recorder = TrialRecorder()  # hears the run folder, for a trial that is cancelled before it replies
        replied: dict[str, Any] = {}
        reply_came = threading.Event()

        def listen(event: dict[str, Any]) -> None:
            if event.get("event") == "reply" and isinstance(event.get("reply"), dict):
                replied.update(event["reply"])
                reply_came.set()
                return
            recorder.on_event(event)
            on_event(event)

        key = self.relay.new_key(listen)
        ref = self.remote.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
            trial.config.to_dict(), key, self.relay.queue, str(self.marker), self.token, self.cpus, self.ship)
        self.refs[key] = ref
        if self.stop_signal is not None:  # the signal came while this trial was being submitted
            ray.cancel(ref, recursive=False)
        try:
            return self._stopped_by_signal(receive(ray.get(ref), self.output_dir))
        except TaskCancelledError:  # the task checkpoints, records its ending and replies through the queue
            if reply_came.wait(timeout=CANCEL_GRACE_SECONDS):
                return self._stopped_by_signal(receive(replied, self.output_dir))
            return recorder.result(128 + (self.stop_signal or 2))
        except RayError as err:  # the worker died (out of memory, node lost...)
            return TrialResult("failed", error=f"the Ray task failed: {type(err).__name__}: {err}", exit_code=1)
        finally:
            self.refs.pop(key, None)
            self.relay.listeners.pop(key, None)

    def _stopped_by_signal(self, result: TrialResult) -> TrialResult:
        """A cancelled trial takes Ray's cancellation for a Ctrl-C (SIGINT) and records that; what
        stopped it is the sweep's signal, which its summary and result are made to say."""
        if result.status != "interrupted" or self.stop_signal is None:
            return result
        said = f"interrupted by {signal_name(self.stop_signal)}"
        if result.summary is not None and result.summary.status == "interrupted" and result.run_dir is not None:
            result.summary.error = said
            RunDir(result.run_dir).write_summary(result.summary)
        result.error, result.exit_code = said, 128 + self.stop_signal
        return result
