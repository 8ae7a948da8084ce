#!/usr/bin/env bash
# The DeepReDuce configurations of the shipped models without fine-tuning: ReLUs (counted
# from each emitted graph) and top-1 accuracy on the full Fashion-MNIST test split.
# Usage: scripts/lossy_table.sh [relucompile binary]   (prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/relucompile}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

row() {
    local model=$1; shift
    local json
    json=$("$bin" "models/$model.onnx" -o "$out/o.onnx" --json --no-progress "$@")
    python3 - "$model" "$*" "$json" <<'PY'
import json, sys
model, flags, report = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
acc = report.get("accuracy") or {}
after = report["after"]["total_relus"]
print(f"| {model} | `{flags or '(lossless pipeline)'}` | {after:,} | "
      f"{100 * acc.get('after', float('nan')):.2f}% | {100 * acc.get('agreement', float('nan')):.2f}% |")
PY
}

echo "| model | configuration | ReLUs | test accuracy | agreement with original |"
echo "|---|---|---:|---:|---:|"
for model in resnet18w16 vgg; do
    row "$model" --data fashion-mnist
done
for cull in 0 1 2 3 4 0,2 1,2 3,4 0,1,2 1,2,3 0,1,2,3 1,2,3,4 0,1,2,3,4; do
    row resnet18w16 --cull "$cull"
done
row resnet18w16 --thin bottom
row resnet18w16 --thin top
row resnet18w16 --cull 1,2 --thin bottom
for t in 0.99 0.95 0.9 0.6; do row resnet18w16 --channel-threshold "$t"; done
for cull in 0 1 2 3 0,1 0,1,2,3; do row vgg --cull "$cull"; done
row vgg --thin alternate
for t in 0.99 0.95 0.9 0.6; do row vgg --channel-threshold "$t"; done
