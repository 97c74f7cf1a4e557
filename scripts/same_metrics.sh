#!/usr/bin/env bash
# Usage: scripts/same_metrics.sh OUT
# Two seeded CPU runs whose metrics.csv a refactor must leave bit-identical (issue 17): configs/lenet.yaml
# for 2 epochs on the real Fashion-MNIST, and configs/resnet9.yaml for 1 epoch on the first 6,000 training
# and 1,000 test images (written to OUT/subset as IDX files; the data from $CNNLAB_DATA or Debian's folder). Each run's metrics.csv, without its timing
# columns (epoch_seconds, train_examples_per_sec), lands in OUT/<name>.csv; compare two OUTs with diff.
set -euo pipefail
out=${1:?usage: scripts/same_metrics.sh OUT}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
data=${CNNLAB_DATA:-/usr/share/datasets/fashion-mnist}
"$python" - "$out/subset" "$data" <<'PY'
import gzip, pathlib, sys
src, dst = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for stem, n in (("train-images-idx3-ubyte", 6000), ("train-labels-idx1-ubyte", 6000),
                ("t10k-images-idx3-ubyte", 1000), ("t10k-labels-idx1-ubyte", 1000)):
    path = src / stem if (src / stem).is_file() else src / (stem + ".gz")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    header = 16 if "images" in stem else 8
    item = 28 * 28 if "images" in stem else 1
    head = bytearray(raw[:header]); head[4:8] = n.to_bytes(4, "big")
    (dst / stem).write_bytes(bytes(head) + raw[header:header + n * item])
PY
run() {  # name, then cnnlab run arguments
    local name=$1; shift
    "$python" -m cnnlab run "$@" --results "$out/runs-$name" --quiet --set train.threads=${THREADS:-2} > "$out/$name.log"
    local dir; dir=$(ls -d "$out/runs-$name"/*/*/)
    "$python" -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); k=[c for c in r[0] if c not in ('epoch_seconds','train_examples_per_sec')]; w=csv.writer(sys.stdout, lineterminator='\n'); w.writerow(k); [w.writerow([x[c] for c in k]) for x in r]" "$dir/metrics.csv" > "$out/$name.csv"
}
run lenet configs/lenet.yaml --epochs 2 --data-dir "$data"
run resnet9 configs/resnet9.yaml --epochs 1 --data-dir "$out/subset" --set data.check_counts=false --set data.val_size=1000
cat "$out"/*.csv
