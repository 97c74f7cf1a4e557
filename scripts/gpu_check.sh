#!/usr/bin/env bash
# The one script a person with a GPU runs: cnnlab's speed and results on that GPU, every figure into
# one JSON file. From the repository root (on a GPU machine without internet access it installs pydantic
# from .whl/ and uses the data in .gpudata/ when they are there):
#
#   scripts/gpu_check.sh                     # everything, figures into $OUT/gpu_check.json
#   STEPS="bench baseline" scripts/gpu_check.sh
#
# Steps (STEPS, in this order):
#   bench     cnnlab bench on LeNet (whole commands too) and on the report's ResNet and GoogLeNet
#   baseline  the 20-epoch LeNet baseline (configs/lenet.yaml), as it runs by default: its training and
#             evaluation steps captured as CUDA graphs (train.cuda_graphs: auto)
#   eager     the same with the ordinary step (train.cuda_graphs=false), with torch.compile's
#             reduce-overhead mode instead (compiled), and with the compiled model captured inside
#             the whole-step graph (compiled_graphs): what the default is compared against
#   resnet9   the ResNet-9 recipe (configs/resnet9.yaml), by default and with the ordinary step
#   fill      how many trials one GPU runs side by side: 12 LeNet trials (configs/kernels/ x 4 seeds,
#             5 epochs) as one sweep with --jobs 1, 2, 4, 8, 16 (FILL_JOBS), seconds for each
#   sweep     the whole lab report: cnnlab sweep configs/seed/ --jobs 4 (several minutes)
#   tests     the test suite
# Settings: OUT (default ./gpu_check), DEVICE (default cuda), EPOCHS (override every run's epochs:
# for a quick try), BATCHES (timed per pipeline by bench), PAIRS (bench's pairs of whole commands, default 5), JOBS (the sweep's, default 4), FILL_JOBS
# (the fill step's --jobs values), FILL_SEEDS (its seeds, default 0,1,2,3), PYTHON (default
# python3), CNNLAB_DATA (the data folder; .gpudata/ when it exists), SETS (extra KEY=VALUE config
# overrides for every run, separated by spaces).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-bench baseline eager resnet9 fill sweep tests}
JOBS=${JOBS:-4}
FILL_SEEDS=${FILL_SEEDS:-0,1,2,3}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# An offline GPU machine: pydantic from the wheels beside the code, the data set beside it too.
if ! "$PYTHON" -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cnnlab-site .whl/*.whl
  export PYTHONPATH="/tmp/cnnlab-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CNNLAB_DATA:-}" ] && [ -d .gpudata ]; then export CNNLAB_DATA="$PWD/.gpudata"; fi
CNNLAB=("$PYTHON" -m cnnlab)
EPOCH_ARGS=()
if [ -n "${EPOCHS:-}" ]; then EPOCH_ARGS=(--set "train.epochs=$EPOCHS"); fi
SET_ARGS=()
for kv in ${SETS:-}; do SET_ARGS+=(--set "$kv"); done

step() {  # step NAME COMMAND...: run it, log it, and note its exit code and seconds
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "{\"step\": \"$name\", \"exit_code\": $code, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
  tail -3 "$OUT/$name.log"
}

rm -f "$OUT/steps.jsonl"
for s in $STEPS; do
  case $s in
    bench)
      step bench_lenet "${CNNLAB[@]}" bench configs/lenet.yaml --device "$DEVICE" --epochs "${EPOCHS:-3}" \
        --batches "${BATCHES:-150}" --pairs "${PAIRS:-5}" --out "$OUT/bench_lenet.json" "${SET_ARGS[@]}"
      step bench_resnet "${CNNLAB[@]}" bench configs/seed/s6_4_resnet.yaml --device "$DEVICE" --no-commands \
        --batches "${BATCHES:-100}" --out "$OUT/bench_resnet.json" "${SET_ARGS[@]}"
      step bench_googlenet "${CNNLAB[@]}" bench configs/seed/s6_3_googlenet.yaml --device "$DEVICE" --no-commands \
        --batches "${BATCHES:-100}" --out "$OUT/bench_googlenet.json" "${SET_ARGS[@]}" ;;
    baseline)
      step baseline "${CNNLAB[@]}" run configs/lenet.yaml --device "$DEVICE" --results "$OUT/baseline" --quiet \
        "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}" ;;
    eager)
      step eager "${CNNLAB[@]}" run configs/lenet.yaml --device "$DEVICE" --results "$OUT/eager" --quiet \
        --set train.cuda_graphs=false "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}"
      step compiled "${CNNLAB[@]}" run configs/lenet.yaml --device "$DEVICE" --results "$OUT/compiled" --quiet \
        --set train.cuda_graphs=false --set train.compile=reduce-overhead "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}"
      step compiled_graphs "${CNNLAB[@]}" run configs/lenet.yaml --device "$DEVICE" --results "$OUT/compiled_graphs" \
        --quiet --set train.cuda_graphs=true --set train.compile=true "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}" ;;
    resnet9)
      step resnet9 "${CNNLAB[@]}" run configs/resnet9.yaml --device "$DEVICE" --results "$OUT/resnet9" --quiet \
        "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}"
      step resnet9_eager "${CNNLAB[@]}" run configs/resnet9.yaml --device "$DEVICE" --results "$OUT/resnet9_eager" \
        --quiet --set train.cuda_graphs=false "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}" ;;
    fill)
      for j in ${FILL_JOBS:-1 2 4 8 16}; do
        step "fill_$j" "${CNNLAB[@]}" sweep configs/kernels/ --seeds "$FILL_SEEDS" --jobs "$j" --set "train.device=$DEVICE" \
          --set "train.epochs=${EPOCHS:-5}" --results "$OUT/fill_$j" --quiet "${SET_ARGS[@]}"
      done ;;
    sweep)
      step sweep "${CNNLAB[@]}" sweep configs/seed/ --jobs "$JOBS" --set "train.device=$DEVICE" \
        --results "$OUT/seed" --quiet "${EPOCH_ARGS[@]}" "${SET_ARGS[@]}" ;;
    tests)
      step tests "$PYTHON" -m pytest -q -p no:cacheprovider ;;
    *) echo "unknown step: $s (bench baseline eager resnet9 fill sweep tests)" >&2; exit 2 ;;
  esac
done

# Every figure into one JSON.
"$PYTHON" - "$OUT" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {"python": platform.python_version(), "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]}
try:
    import torch
    report["torch"] = torch.__version__
    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as err:
    report["torch"] = f"unavailable: {err}"
for name in ("bench_lenet", "bench_resnet", "bench_googlenet"):
    if (out / f"{name}.json").is_file():
        report[name] = json.loads((out / f"{name}.json").read_text())
for name in ("baseline", "eager", "compiled", "compiled_graphs", "resnet9", "resnet9_eager"):
    found = sorted((out / name).glob("*/*/summary.json"))
    if found:
        s = json.loads(found[-1].read_text())
        report[name] = {k: s.get(k) for k in ("status", "test_acc", "best_val_acc", "epochs_completed", "wall_seconds",
                                              "train_seconds", "train_examples_per_sec", "startup_seconds", "device_name",
                                              "train_step", "train_step_note")}
for graphs, eager in (("baseline", "eager"), ("baseline", "compiled"), ("baseline", "compiled_graphs"),
                      ("resnet9", "resnet9_eager")):
    a, b = report.get(graphs), report.get(eager)
    if a and b and a.get("train_examples_per_sec") and b.get("train_examples_per_sec"):
        report[f"{graphs}_vs_{eager}"] = {
            "speed_ratio": a["train_examples_per_sec"] / b["train_examples_per_sec"],
            "test_acc_difference": (a["test_acc"] or 0) - (b["test_acc"] or 0)}
fill = {s["step"][5:]: s["seconds"] for s in report["steps"] if s["step"].startswith("fill_") and s["exit_code"] == 0}
if fill:
    trials = len(list((out / f"fill_{next(iter(fill))}" / "sweeps" / "kernels" / "runs").glob("*/*/summary.json")))
    report["fill"] = {"trials": trials, "seconds_by_jobs": fill}
sweeps = sorted((out / "seed" / "sweeps").glob("*/2*/trials.json"))
if sweeps:
    rows = json.loads(sweeps[-1].read_text())
    report["sweep"] = {"trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
                       "test_acc": {r["name"]: r.get("test_acc") for r in rows}}
tests = out / "tests.log"
if tests.is_file():
    report["tests"] = (tests.read_text().strip().splitlines() or [""])[-1]
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"-> {out / 'gpu_check.json'}")
PY
