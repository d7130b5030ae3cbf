#!/usr/bin/env bash
# Memory and scale benchmarks on one GPU (docs/BENCHMARKS.md, "Memory" and "Scale"), one `fasttune bench train`
# per section, each under its own time limit so one slow section cannot starve the others. Results: every
# section's Markdown table into $OUT/summary.md, all JSON rows into $OUT/rows.tar.gz, the log into $OUT/log.txt.
# Run from the repository root with fasttune importable (and flash-attn-4 + liger-kernel for the FA4 rows).
# The 1B sections measure 4 epochs of the 64-sample mix (~20 steps a row): one epoch is ~5 steps, and two identical
# one-epoch rows differed by 8% (docs/BENCHMARKS.md, "Memory", fourth run).
set -uo pipefail
OUT=${OUT:-bench-results}
work=$(mktemp -d)
mkdir -p "$OUT"
bench() {  # NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: fasttune bench train $*" | tee -a "$OUT/summary.md"
  timeout "$limit" python -m fasttune bench train --out "$work/$name" "$@" >>"$OUT/log.txt" 2>&1
  echo "(exit $?)" >>"$OUT/summary.md"
  cat "$work/$name"/*.md >>"$OUT/summary.md" 2>/dev/null
  echo >>"$OUT/summary.md"
}
python - <<'PY' >"$OUT/summary.md" 2>&1
import torch, transformers, importlib.metadata as m
def v(p):
    try: return m.version(p)
    except Exception: return "-"
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, transformers "
      f"{transformers.__version__}, triton {v('triton')}, flash-attn-4 {v('flash-attn-4')}, liger-kernel {v('liger-kernel')}")
PY
mode=${1:-fa4}  # fa4: flash-attn-4 + liger-kernel installed; default: neither (the zero-extra install); long: 32k docs
if [[ $mode == default ]]; then
  # 1B: fasttune's plans against HF sdpa packed (leak-free 4D mask), all without optional packages.
  bench 1b 150 --preset 1b --attn auto --packing on --warmup-epochs 2 --epochs 4 --equal-tokens \
    --hf-only "sdpa packed" --variant "plan none:model.memory=none" \
    --variant "plan every-2:model.memory=every:2" --variant "8k packs:data.micro_batch_size=4"
  bench 8b 100 --preset llama-3.1-8b --vocab 128256 --attn auto --packing on --samples 32 --micro-batch 4 \
    --hf-micro-batch 16 --hf-ckpt --hf-only "sdpa packed (4D mask) + grad ckpt" --warmup-epochs 1 --epochs 1
elif [[ $mode == fa4 ]]; then
  no_extras="attn_implementation=varlen,model.liger=false"
  # 1B: flash-attn-4 + Liger against the leanest (FA4 + Liger) and fastest (FA4 packed) HF stacks, same run; `full`
  # as it ships (8k-token packs, auto plan) and the packs/plans around it, and the default install for reference.
  bench 1b 300 --preset 1b --attn auto --packing on --micro-batch 4 --hf-micro-batch 8 --warmup-epochs 2 \
    --epochs 4 --equal-tokens --variant "Liger, 8k packs, plan ops:model.memory=ops" \
    --variant "Liger, 6k packs:data.micro_batch_size=3" --variant "Liger, 16k packs:data.micro_batch_size=8" \
    --variant "Liger, 16k packs, plan ops:data.micro_batch_size=8,model.memory=ops" \
    --variant "default install (varlen, no Liger), 8k packs:$no_extras"
  # 8B (Llama-3.1-8B shape, its 128k vocabulary), 8k-token packs, against the HF settings that fit (grad ckpt).
  bench 8b 200 --preset llama-3.1-8b --vocab 128256 --attn auto --packing on --samples 32 --micro-batch 4 \
    --hf-micro-batch 16 --hf-ckpt --hf-only "FA4 packed (cu_seq_lens) + grad ckpt,FA4 packed + Liger + grad ckpt" \
    --warmup-epochs 1 --epochs 1
fi
if [[ $mode == long ]]; then
  # 32k-token documents, one per step.
  bench long-1b 40 --preset 1b --attn auto --packing on --samples 4 --median 32768 --mean 32768 --min-length 32768 \
    --max-length 32768 --micro-batch 1 --no-baselines --warmup-epochs 1 --epochs 1
  bench long-8b 70 --preset llama-3.1-8b --vocab 128256 --attn auto --packing on --samples 3 --median 32768 \
    --mean 32768 --min-length 32768 --max-length 32768 --micro-batch 1 --no-baselines --warmup-epochs 1 --epochs 1
fi
tar -czf "$OUT/rows.tar.gz" -C "$work" . 2>/dev/null
tail -c 20000 "$OUT/log.txt" >"$OUT/log-tail.txt"
rm -f "$OUT/log.txt"
cat "$OUT/summary.md"
