#!/usr/bin/env bash
# The benchmark run behind docs/BENCHMARKS.md, as run on the lent H100, from the repo root.
#   docs/bench/device.sh smoke            small grid, checks the GPU paths
#   docs/bench/device.sh full [ARGS...]   the full train (ARGS: extra `bench train` options) + attention runs
#   docs/bench/device.sh attn SECONDS [ARGS...]   only `bench attention` (ARGS: its options)
# Results land in $OUT (default ./bench-out: json, md, png per benchmark, and the log).
# Needs: a CUDA GPU and fasttune installed with the fast paths (`pip install -e ".[fa4,liger]"`). On a machine
# without network the wheels are installed into /tmp/site when present, nothing is fetched: `smoke` stages
# .devwheels-a in /root/stage; `full`/`attn` join the files split over .devwheels-a/-b (NAME.part-aa/-ab) and install
# them with .devwheels-c (liger-kernel).
set -uo pipefail
shopt -s nullglob
mode=${1:-full}
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
install_wheels() {
  local wheels=(/root/stage/*.whl .devwheels-c/*.whl)
  if (( ${#wheels[@]} )); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 3
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
}
res=/tmp/bench-results; mkdir -p "$res"
if [[ $mode == smoke ]]; then
  [[ -d .devwheels-a ]] && mkdir -p /root/stage && cp .devwheels-a/* /root/stage/
  args_attn=(--seq-lens 1024,4096 --head-dims 128)
  args_train=(--attn auto,sdpa --epochs 1)
elif [[ $mode == full ]]; then
  for h in /root/stage/*.part-aa; do b=${h%.part-aa}; cat "$h" ".devwheels-b/${b##*/}.part-ab" > "$b" && rm -f "$h"; done
  install_wheels
  args_attn=()
  args_train=("$@"); args_train=("${args_train[@]:1}")
fi
if [[ $mode == attn ]]; then  # on the same machine after `full`, the wheels are staged already
  install_wheels
  timeout "${2:-240}" python3 -m fasttune bench attention "${@:3}" --out "$OUT" > "$OUT/log.txt" 2>&1
  echo "attention rc=$?"; tr '\r' '\n' < "$OUT/log.txt" | grep -E "^\- |it/s" | tail -8; exit 0
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m fasttune bench train "${args_train[@]}" --out "$OUT" > "$OUT/log.txt" 2>&1
echo "train rc=$?"; grep -E "^\| |^\- " "$OUT/log.txt" | tail -24
python3 -m fasttune bench attention "${args_attn[@]}" --out "$res" >> "$OUT/log.txt" 2>&1
echo "attention rc=$?"; grep -E "^\- |^\| (packed|padded) .*auto" "$OUT/log.txt" | tail -30
cp "$res"/attention.json "$res"/attention.md "$res"/attention.png "$OUT/" 2>/dev/null
grep -E "Error|error|Traceback" "$OUT/log.txt" | sort | uniq -c | sort -rn | head -20
