"""Usage: ``cpus = usable_cpus()``; ``cpus.count`` threads fit this process, ``cpus.reason`` says why.

How many CPUs this process may really use, which is often fewer than ``os.cpu_count()`` (and torch's
default thread count) says: the affinity mask (``taskset``, ``docker --cpuset-cpus``), the cgroup's CPU
quota (``docker --cpus 2``, a Kubernetes limit; cgroup v2's ``cpu.max`` or v1's ``cpu.cfs_quota_us``), and
never more than the physical cores among the allowed CPUs (a second hyperthread of a core rarely helps a
convolution and oversubscribed OpenMP threads spin against each other). Plain files only: no torch here.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cpus:
    count: int  # threads that fit: the tightest of the limits below, at least 1
    logical: int  # what os.cpu_count() says
    reason: str  # what set ``count``, in words

    def as_dict(self) -> dict[str, object]:
        return {"usable": self.count, "usable_reason": self.reason, "logical": self.logical}


def usable_cpus(root: str | os.PathLike = "/", affinity: set[int] | None = None) -> Cpus:
    """The CPUs this process may use; ``root`` and ``affinity`` stand in for the machine's files and mask in tests."""
    root = Path(root)
    logical = os.cpu_count() or 1
    if affinity is None:
        affinity = _affinity(logical)
    limits: list[tuple[float, str]] = [(len(affinity), f"{len(affinity)} CPU(s) in the affinity mask")]
    cores = _physical_cores(root / "proc/cpuinfo", affinity)
    if cores is not None and cores < len(affinity):
        limits.append((cores, f"{cores} physical core(s) among them"))
    quota = cgroup_quota(root)
    if quota is not None:
        limits.append(quota)
    count, reason = min(limits, key=lambda limit: limit[0])
    return Cpus(max(1, math.floor(count)), logical, reason)


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (where there is one)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _affinity(logical: int) -> set[int]:
    with contextlib.suppress(AttributeError, OSError):
        return set(os.sched_getaffinity(0))
    return set(range(logical))


def _physical_cores(cpuinfo: Path, allowed: set[int]) -> int | None:
    """Distinct (package, core) pairs among the ``allowed`` processors, or None where /proc/cpuinfo does not say."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "processor" not in fields or "core id" not in fields:
            continue
        with contextlib.suppress(ValueError):
            if int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def cgroup_quota(root: Path) -> tuple[float, str] | None:
    """The tightest CPU quota of this process's cgroups (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) as (CPUs, words)."""
    found: list[tuple[float, str]] = []
    for group in _cgroup_dirs(root):
        quota = _v2_quota(group / "cpu.max") or _v1_quota(group / "cpu.cfs_quota_us", group / "cpu.cfs_period_us")
        if quota is not None:
            found.append(quota)
    return min(found, key=lambda item: item[0]) if found else None


def _cgroup_dirs(root: Path) -> list[Path]:
    """This process's CPU cgroup folders and their parents up to the hierarchy's root (a limit may sit on any)."""
    base = root / "sys/fs/cgroup"
    v1 = next((base / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (base / name).is_dir()), None)
    groups: list[tuple[Path, str]] = []
    with contextlib.suppress(OSError, ValueError):
        for line in (root / "proc/self/cgroup").read_text(encoding="utf-8").splitlines():
            _, controllers, path = line.split(":", 2)
            if not controllers:  # cgroup v2's one hierarchy
                groups.append((base, path))
            elif v1 is not None and "cpu" in controllers.split(","):
                groups.append((v1, path))
    if not groups:
        groups = [(base, "/")] + ([(v1, "/")] if v1 is not None else [])
    dirs: list[Path] = []
    for mount, path in groups:  # in a container the path may be the host's: then the mount itself is the group
        parts = [part for part in path.split("/") if part and part != ".."]
        for depth in range(len(parts), -1, -1):
            folder = mount.joinpath(*parts[:depth])
            if folder not in dirs and folder.is_dir():
                dirs.append(folder)
    return dirs


def _v2_quota(path: Path) -> tuple[float, str] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = path.read_text(encoding="ascii").split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = int(quota) / int(period)
            return cpus, f"a cgroup CPU quota of {cpus:g} CPU(s) ({path}: {quota} {period})"
    return None


def _v1_quota(quota_path: Path, period_path: Path) -> tuple[float, str] | None:
    with contextlib.suppress(OSError, ValueError):
        quota, period = int(quota_path.read_text(encoding="ascii")), int(period_path.read_text(encoding="ascii"))
        if quota > 0 and period > 0:
            cpus = quota / period
            return cpus, f"a cgroup CPU quota of {cpus:g} CPU(s) ({quota_path}: {quota} per {period})"
    return None


MIN_WINDOW = 0.25  # seconds of /proc/stat a load figure spans at least (its counters tick every 10 ms)
BUSY_CPUS = 0.5  # other processes' average use (in CPUs) from which the machine counts as busy


@dataclass(frozen=True)
class Load:
    """How many CPUs other processes keep busy, from /proc/stat's counters less this process's own."""

    started: float  # time.monotonic() of the first reading
    busy: int  # all CPUs' busy ticks then
    own: int  # this process's ticks then
    others: float = 0.0  # other processes' average use in CPUs over the window, once measured
    root: Path = Path("/")

    @classmethod
    def start(cls, root: str | os.PathLike = "/") -> Load | None:
        """The first reading, or None where /proc does not say (not Linux)."""
        root = Path(root)
        ticks = _busy_ticks(root), _own_ticks(root)
        if None in ticks:
            return None
        return cls(time.monotonic(), ticks[0], ticks[1], root=root)

    def others_now(self, min_window: float = MIN_WINDOW) -> float:
        """Other processes' average CPU use since ``start`` (waiting until ``min_window`` seconds have passed)."""
        time.sleep(max(0.0, min_window - (time.monotonic() - self.started)))
        busy, own = _busy_ticks(self.root), _own_ticks(self.root)
        seconds = time.monotonic() - self.started
        if busy is None or own is None or seconds <= 0:
            return 0.0
        return max(0.0, (busy - self.busy - (own - self.own)) / TICKS / seconds)


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks(root: Path) -> int | None:
    """All CPUs' non-idle ticks: user, nice, system, irq, softirq and steal (another VM's turn is not ours either)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(root / "proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return user + nice + system + irq + softirq + steal
    return None


def _own_ticks(root: Path) -> int | None:
    """This process's user and system ticks, all its threads together."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = (root / "proc/self/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return None


# The reading taken when the ``cnnlab`` command started (``mark_start``): how busy the machine is while a
# run starts is measured from there, before PyTorch is imported.
START: Load | None = None
OPENMP_WINDOW = 0.05  # seconds of reading at least before the OpenMP wait policy is chosen


def mark_start() -> None:
    """Take the first load reading; called first thing by the ``cnnlab`` command."""
    global START
    START = Load.start()


def calm_openmp_if_busy() -> float | None:
    """Before PyTorch is imported: when other processes keep the machine busy, have OpenMP's threads sleep
    while they wait for each other instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, which libgomp reads as
    torch loads it). It changes no result (the thread count and the work's split stay), only speed: beside one
    busy CPU, LeNet's 2-thread step ran 7,200 img/s so against 1,800 spinning; on a quiet machine spinning is
    faster (27,700 against 20,400), so it is only done when busy. Not when the user set a policy, or a
    scheduler gave this process its share (``OMP_NUM_THREADS``: the busy CPUs are its siblings), or torch is
    loaded already. Returns the other processes' use in CPUs when it was measured."""
    if START is None or "torch" in sys.modules or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("OMP_NUM_THREADS"):
        return None
    others = START.others_now(OPENMP_WINDOW)
    if others >= BUSY_CPUS:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return others
