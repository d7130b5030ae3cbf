#!/usr/bin/env bash
# GPU validation on the lent H100 (device tool), from the repo root, results in $OUT. Two back-to-back calls:
#   scripts/device_validate.sh plain   carry [.devwheels-a, .whl]: stages .devwheels-a, then WITHOUT flash-attn-4 or
#                                      Liger (a default install): doctor, GPU tests, `full` end to end (short)
#   scripts/device_validate.sh fa4     carry [.devwheels-b, .devwheels-c, .whl]: installs flash-attn-4 + liger-kernel,
#                                      then doctor, GPU tests, `full` end to end and `bench train` (8k-token budget)
# Wheels: shared/tools/device-wheels.sh (a/b), liger-kernel in .devwheels-c, tyro/hypothesis/pytest-timeout in .whl.
set -uo pipefail
mode=${1:-plain}; steps=${2:-40}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
mkdir -p /tmp/site
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
if [[ $mode == plain ]]; then
  mkdir -p /root/stage && cp .devwheels-a/* /root/stage/
  pip .whl/*.whl /root/stage/pytest-*.whl /root/stage/pluggy-*.whl /root/stage/iniconfig-*.whl || exit 3
else
  for h in /root/stage/*.part-aa; do [ -e "$h" ] || continue; b=${h%.part-aa}; cat "$h" ".devwheels-b/${b##*/}.part-ab" > "$b" && rm -f "$h"; done
  rm -f /root/stage/pytest*.whl /root/stage/pluggy-*.whl /root/stage/iniconfig-*.whl  # installed by the plain call
  pip /root/stage/*.whl .devwheels-c/*.whl || exit 3
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
