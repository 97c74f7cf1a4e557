"""How many CPUs a run may use (cpus.py) and how its thread count is chosen (threads.py): the machine's files
(/proc/cpuinfo, /proc/self/cgroup, the cgroup's quota, /proc/stat) faked in a folder, the rest real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.cpus import BUSY_CPUS, Cpus, Load, usable_cpus
from cnnlab.errors import UserError
from cnnlab.threads import choose_threads, probe_if_busy, scratch_step


def cpuinfo(cores: int, threads_per_core: int = 1) -> str:
    blocks = []
    for processor in range(cores * threads_per_core):
        blocks.append(f"processor\t: {processor}\nphysical id\t: 0\ncore id\t\t: {processor % cores}\n"
                      f"cpu cores\t: {cores}\n")
    return "\n".join(blocks) + "\n"


def machine(root: Path, *, cores: int = 4, threads_per_core: int = 1, cgroup: str = "0::/\n",
            files: dict[str, str] | None = None) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(cpuinfo(cores, threads_per_core))
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "sys/fs/cgroup").mkdir(parents=True)
    for name, text in (files or {}).items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_affinity_mask_limits_the_count(tmp_path):
    cpus = usable_cpus(machine(tmp_path, cores=8), affinity={2, 5, 6})
    assert (cpus.count, cpus.reason) == (3, "3 CPU(s) in the affinity mask")


def test_hyperthreads_of_one_core_count_once(tmp_path):
    root = machine(tmp_path, cores=4, threads_per_core=2)  # processors 0-7; 0 and 4 share core 0
    assert usable_cpus(root, affinity=set(range(8))).count == 4
    cpus = usable_cpus(root, affinity={0, 4})
    assert (cpus.count, cpus.reason) == (1, "1 physical core(s) among them")


def test_a_cgroup_v2_quota_is_floored_and_the_tightest_ancestor_wins(tmp_path):
    root = machine(tmp_path, cores=8, cgroup="0::/kubepods/pod1/box\n", files={
        "kubepods/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "250000 100000\n",
        "kubepods/pod1/box/cpu.max": "max 100000\n",
    })
    cpus = usable_cpus(root, affinity=set(range(8)))
    assert cpus.count == 2
    assert "quota of 2.5 CPU(s)" in cpus.reason and "pod1/cpu.max" in cpus.reason


def test_a_quota_under_one_cpu_still_leaves_one_thread(tmp_path):
    root = machine(tmp_path, files={"cpu.max": "50000 100000\n"})
    assert usable_cpus(root, affinity=set(range(4))).count == 1


def test_a_cgroup_v1_quota_seen_from_inside_a_container(tmp_path):
    # docker --cpus 2 on cgroup v1: the path is the host's, the mount shows the container's own group
    root = machine(tmp_path, cores=16, cgroup="4:cpu,cpuacct:/docker/abc123\n3:memory:/docker/abc123\n", files={
        "cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    cpus = usable_cpus(root, affinity=set(range(16)))
    assert (cpus.count, cpus.logical >= 1) == (2, True)
    assert "cpu.cfs_quota_us" in cpus.reason


def test_no_quota_and_unreadable_files_fall_back_to_the_mask(tmp_path):
    root = machine(tmp_path, cores=4, files={"cpu.max": "max 100000\n"})
    assert usable_cpus(root, affinity=set(range(4))).count == 4
    (tmp_path / "proc/cpuinfo").unlink()
    assert usable_cpus(tmp_path, affinity={0, 1}).count == 2
    assert usable_cpus(tmp_path / "nowhere", affinity={0, 1, 2}).count == 3


def test_this_machine(tmp_path):
    cpus = usable_cpus()
    assert 1 <= cpus.count <= cpus.logical


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_caps_torch_default_at_the_usable_cpus(torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    choice = choose_threads("auto", Cpus(1, 2, "a cgroup CPU quota of 1 CPU(s)"))
    assert (choice.count, torch.get_num_threads(), choice.reason) == (1, 1, "a cgroup CPU quota of 1 CPU(s)")
    assert choice.as_dict()["usable"] == 1
    torch.set_num_threads(2)
    assert choose_threads(None, Cpus(4, 4, "4 CPU(s) in the affinity mask")).count == 2  # null is auto


def test_a_number_is_kept_and_too_many_is_refused(torch_threads):
    assert choose_threads(1, Cpus(1, 2, "x")).count == 1  # asked for by number: not capped
    with pytest.raises(UserError, match="train.threads: 3 is more than this machine's 2 CPU"):
        choose_threads(3, Cpus(2, 2, "x"))


def test_omp_num_threads_is_a_share_given_from_outside(torch_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = choose_threads("auto", Cpus(2, 2, "x"))
    assert choice.reason == "OMP_NUM_THREADS=1" and choice.load is None  # a sweep's siblings are not a reason to probe


def fake_load(tmp_path: Path, others_cpus: float, seconds: float = 100.0) -> Load:
    """A Load whose /proc/stat advances as if other processes had used ``others_cpus`` for ``seconds`` (long, so that
    the moments the test itself takes do not change the figure, however loaded the machine)."""
    (tmp_path / "proc/self").mkdir(parents=True, exist_ok=True)
    stat, own = tmp_path / "proc/stat", tmp_path / "proc/self/stat"
    stat.write_text("cpu  100 0 100 1000 0 0 0 0 0 0\n")
    own.write_text("1 (python) R " + " ".join(["0"] * 10) + " 10 10 0 0\n")
    load = Load.start(tmp_path)
    busy = int(others_cpus * seconds * 100)  # ticks at 100 a second
    stat.write_text(f"cpu  {100 + busy} 0 100 1000 0 0 0 0 0 0\n")
    return Load(time.monotonic() - seconds, load.busy, load.own, root=tmp_path)


def paced_step(fast_count: int):
    """A step that sleeps less at ``fast_count`` threads: which count the probe finds faster is then known."""
    def step() -> int:
        time.sleep(0.002 if torch.get_num_threads() == fast_count else 0.012)
        return 64
    return lambda: step


def test_a_busy_machine_gets_one_line_naming_the_faster_count(tmp_path, torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    choice = choose_threads("auto", Cpus(2, 2, "x"), load=fake_load(tmp_path, others_cpus=1.0))
    probed = probe_if_busy(choice, paced_step(fast_count=1))
    assert probed.count == 2 and torch.get_num_threads() == 2  # auto keeps the reproducible count
    assert probed.probe[1] > probed.probe[2]
    assert "other processes use 1.0 of its 2 CPUs" in probed.line and "--threads 1 would be faster" in probed.line
    assert "measured 1 thread " in probed.line and "img/s, 2 threads " in probed.line  # the faster first
    assert probed.as_dict()["busy_cpus"] == 1.0 and set(probed.as_dict()["probe"]) == {"1", "2"}


def test_fastest_takes_the_faster_count(tmp_path, torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    choice = choose_threads("fastest", Cpus(2, 2, "x"), load=fake_load(tmp_path, others_cpus=1.2))
    probed = probe_if_busy(choice, paced_step(fast_count=1))
    assert (probed.count, torch.get_num_threads(), probed.reason) == (1, 1, "fastest in the start-up probe")


def test_when_the_run_count_is_faster_it_is_kept_and_said(tmp_path, torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    choice = choose_threads("fastest", Cpus(2, 2, "x"), load=fake_load(tmp_path, others_cpus=1.0))
    probed = probe_if_busy(choice, paced_step(fast_count=2))
    assert probed.count == 2 and probed.line.endswith("training with 2 threads")


def test_a_quiet_machine_is_not_probed(tmp_path, torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    choice = choose_threads("auto", Cpus(2, 2, "x"), load=fake_load(tmp_path, others_cpus=BUSY_CPUS / 4))

    def never():
        raise AssertionError("probed a quiet machine")
    probed = probe_if_busy(choice, never)
    assert probed.line is None and probed.probe == {} and probed.as_dict()["busy_cpus"] < BUSY_CPUS


def test_the_probe_leaves_the_model_and_random_streams_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    rng = torch.get_rng_state()
    step = scratch_step(model, batch, nn.CrossEntropyLoss())
    assert step() == 8 and step() == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_run_records_its_thread_choice_and_takes_threads_from_the_command_line(tiny_overrides, tmp_path):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "cnnlab", "run", "configs/lenet.yaml", "--quiet", "--threads", "1",
               *[arg for item in tiny_overrides for arg in ("--set", item)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(next((tmp_path / "results").glob("*/*/summary.json")).read_text())
    assert summary["threads"] == 1
    assert summary["cpus"]["setting"] == "1" and summary["cpus"]["reason"] == "train.threads"
    assert 1 <= summary["cpus"]["usable"] <= summary["cpus"]["logical"]

    too_many = subprocess.run([*command[:7], "99", *command[8:]], capture_output=True, text=True, timeout=300)
    assert too_many.returncode == 2 and "train.threads: 99 is more than this machine's" in too_many.stderr
    assert "Traceback" not in too_many.stderr
    bad = subprocess.run([*command[:7], "many", *command[8:]], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "train.threads" in bad.stderr and "Traceback" not in bad.stderr


CALM = """
import json, os, sys, time
from pathlib import Path
from cnnlab import cpus
root, others = Path(sys.argv[1]), float(sys.argv[2])
(root / "proc/self").mkdir(parents=True, exist_ok=True)
(root / "proc/stat").write_text("cpu  100 0 100 1000 0 0 0 0 0 0\\n")
(root / "proc/self/stat").write_text("1 (python) R " + " ".join(["0"] * 10) + " 10 10 0 0\\n")
start = cpus.Load.start(root)
(root / "proc/stat").write_text(f"cpu  {100 + int(others * 100 * 100)} 0 100 1000 0 0 0 0 0 0\\n")
cpus.START = cpus.Load(time.monotonic() - 100, start.busy, start.own, root=root)  # 100 s: the test's own moments do not count
measured = cpus.calm_openmp_if_busy()
print(json.dumps({"measured": measured, "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.parametrize("others, policy", [(1.0, "PASSIVE"), (0.1, None)])
def test_openmp_threads_sleep_instead_of_spinning_when_the_machine_is_busy_before_torch_loads(tmp_path, others, policy):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", CALM, str(tmp_path), str(others)], capture_output=True, text=True,
                          env=env, timeout=60)
    result = json.loads(done.stdout)
    assert result["policy"] == policy and abs(result["measured"] - others) < 0.2
    # The user's own policy, and a scheduler's share of the CPUs, are left alone
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_NUM_THREADS": "1"}):
        done = subprocess.run([sys.executable, "-c", CALM, str(tmp_path), "1.0"], capture_output=True, text=True,
                              env={**env, **given}, timeout=60)
        assert json.loads(done.stdout) == {"measured": None, "policy": given.get("OMP_WAIT_POLICY")}


def test_a_run_beside_a_cpu_hog_lets_openmp_threads_sleep_and_says_so(tiny_overrides, tmp_path):
    """A real hog: whatever else the machine runs, one CPU kept busy makes it busy."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        command = [sys.executable, "-m", "cnnlab", "run", "configs/lenet.yaml", "--quiet", "--epochs", "1",
                   *[arg for item in tiny_overrides for arg in ("--set", item)]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    finally:
        hog.kill()
        hog.wait()
    assert done.returncode == 0, done.stderr
    cpus = json.loads(next((tmp_path / "results").glob("*/*/summary.json")).read_text())["cpus"]
    assert cpus["busy_cpus"] >= BUSY_CPUS and cpus["openmp_wait_policy"] == "PASSIVE"
