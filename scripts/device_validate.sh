#!/usr/bin/env bash
# GPU validation, from the repo root; results in $OUT (default ./validate-out). Two modes:
#   scripts/device_validate.sh plain [STEPS]   a default install, no flash-attn-4 or Liger: doctor, the GPU tests,
#                                              `full` end to end (short)
#   scripts/device_validate.sh fa4 [STEPS]     with flash-attn-4 + liger-kernel: the same, then `bench train`
#                                              (8k-token budget)
# Needs: a CUDA GPU and fasttune's dependencies (`pip install -e ".[dev]"`; for fa4 `pip install -e ".[dev,fa4,liger]"`).
# On a machine without network, wheel folders are installed into /tmp/site when present (nothing else is fetched):
#   .whl (tyro, datasets, hypothesis, pytest-timeout), .devwheels-a + .devwheels-b (flash-attn-4 and its
#   dependencies; files over the size limit split into NAME.part-aa in -a and NAME.part-ab in -b), .devwheels-c
#   (liger-kernel). A `plain` call stages .devwheels-a in /root/stage for a later `fa4` call on the same machine.
set -uo pipefail
mode=${1:-plain}; steps=${2:-40}
OUT=${OUT:-$PWD/validate-out}; mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
shopt -s nullglob
if [[ $mode == plain ]]; then
  [[ -d .devwheels-a ]] && mkdir -p /root/stage && cp .devwheels-a/* /root/stage/
  wheels=(.whl/*.whl /root/stage/pytest-*.whl /root/stage/pluggy-*.whl /root/stage/iniconfig-*.whl)
  if (( ${#wheels[@]} )); then pip "${wheels[@]}" || exit 3; fi
else
  for h in /root/stage/*.part-aa; do b=${h%.part-aa}; cat "$h" ".devwheels-b/${b##*/}.part-ab" > "$b" && rm -f "$h"; done
  rm -f /root/stage/pytest*.whl /root/stage/pluggy-*.whl /root/stage/iniconfig-*.whl  # installed by the plain call
  wheels=(/root/stage/*.whl .devwheels-c/*.whl)
  if (( ${#wheels[@]} )); then pip "${wheels[@]}" || exit 3; fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
fi
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee $OUT/versions.txt
python3 -m fasttune doctor --json > $OUT/doctor-$mode.json 2> $OUT/doctor-$mode.err; echo "doctor rc=$?"
python3 -m fasttune doctor > $OUT/doctor-$mode.txt 2>&1; tail -6 $OUT/doctor-$mode.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests > $OUT/gpu-tests-$mode.txt 2>&1; tail -4 $OUT/gpu-tests-$mode.txt
timeout 240 python3 main.py --experiment full --max-steps "$steps" --output-dir /tmp/full --data.max-documents 800 \
  --training.eval-every 20 --training.eval-batches 4 --training.log-every 5 --training.warmup-steps 5 > $OUT/full-$mode.txt 2>&1
echo "full rc=$?"; grep -E "attention|Liger|liger|val_loss|step .*/|tok/s|error|MFU|peak" $OUT/full-$mode.txt | tail -14
if [[ $mode == fa4 ]]; then
  timeout 280 python3 -m fasttune bench train --attn auto --packing on --epochs 1 \
    --variant "auto packed, 8k-token budget:data.micro_batch_size=4" --out $OUT/bench > $OUT/bench-log.txt 2>&1
  echo "bench rc=$?"; grep -E "^\| " $OUT/bench-log.txt | tail -12
fi
