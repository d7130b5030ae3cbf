#!/usr/bin/env bash
# The benchmark run behind docs/BENCHMARKS.md, as run on the lent H100 (`run` device tool), from the repo root.
#   docs/bench/device.sh smoke   small grid, checks the GPU paths (and stages .devwheels-a, see device-wheels.sh)
#   docs/bench/device.sh full    installs flash-attn-4 + liger-kernel wheels, then the full attention + train runs
# Results land in $OUT (json, md, png per benchmark, and the log).
set -uo pipefail
mode=${1:-full}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
res=/tmp/bench-results; mkdir -p "$res"
if [[ $mode == smoke ]]; then
  mkdir -p /root/stage && cp .devwheels-a/* /root/stage/
  args_attn=(--seq-lens 1024,4096 --head-dims 128)
  args_train=(--attn auto,sdpa --epochs 1)
elif [[ $mode == full ]]; then
  for h in /root/stage/*.part-aa; do [ -e "$h" ] || continue; b=${h%.part-aa}; cat "$h" ".devwheels-b/${b##*/}.part-ab" > "$b" && rm -f "$h"; done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/stage/*.whl .devwheels-c/*.whl || exit 3
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  args_attn=()
  args_train=("$@"); args_train=("${args_train[@]:1}")
fi
if [[ $mode == attn ]]; then  # same warm machine after `full`: the wheels are staged already
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/stage/*.whl .devwheels-c/*.whl || exit 3
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
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
