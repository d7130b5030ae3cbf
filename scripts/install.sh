#!/usr/bin/env sh
# Install fasttune from this checkout into the active Python environment (the README's quickstart runs this).
# torch comes first, so that pip never pulls a build this machine cannot use:
#   NVIDIA GPU (nvidia-smi answers): torch from PyPI, a CUDA build (an older driver needs another index:
#                                     docs/INSTALL.md, section 2)
#   no NVIDIA GPU:                    torch's CPU build ("+cpu") from PyTorch's CPU index (~200 MB instead of the
#                                     ~5.5 GB of CUDA packages PyPI's Linux build brings), or, where that index is out
#                                     of reach, the newest "+cpu" build pip's other configured sources offer
#   torch >= 2.11 already installed:  kept (and said when it is a CUDA build on a machine without a GPU)
# FASTTUNE_TORCH overrides the torch step: the arguments given to `pip install` (e.g. "torch==2.13.0" where a local
# wheel or mirror serves the CPU build). FASTTUNE_EXTRAS picks the extras (default: dev = tests and linters).
set -eu
cd "$(dirname "$0")/.."
pip_install() { echo "+ pip install $*"; python -m pip install "$@"; }
installed=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi
if [ -n "${FASTTUNE_TORCH:-}" ]; then
  echo "torch: FASTTUNE_TORCH=$FASTTUNE_TORCH"
  # shellcheck disable=SC2086 # the variable holds several pip arguments
  pip_install $FASTTUNE_TORCH
elif [ -n "$installed" ] && python -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))"; then
  echo "torch $installed is installed: kept"
  if [ "$gpu" = 0 ] && python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "note: it is a CUDA build on a machine without an NVIDIA GPU; it runs on the CPU, but its CUDA packages take" \
         "~5 GB: 'pip uninstall -y torch' and rerun this script for the CPU build"
  fi
elif [ "$gpu" = 1 ]; then
  echo "torch: NVIDIA GPU found, installing a CUDA build from PyPI (older drivers: docs/INSTALL.md, section 2)"
  pip_install "torch>=2.11"
else
  # Ask pip what the CPU index would give. Where that index is out of reach, pip's other configured sources (a mirror,
  # a wheel folder) answer instead and may offer a CUDA build first: then take their newest "+cpu" build, if any.
  cpu_index=https://download.pytorch.org/whl/cpu
  pick=$(python -m pip install --dry-run --ignore-installed --no-deps "torch>=2.11" --index-url "$cpu_index" 2>/dev/null |
    sed -n 's/^Would install torch-\([^ ]*\).*/\1/p')
  from="--index-url $cpu_index"
  case "$pick" in
    *+cpu) ;;
    *) from=""  # the CPU index did not answer: install from the sources that offer the "+cpu" build
       pick=$(python -m pip index versions torch 2>/dev/null | sed -n 's/^Available versions: //p' | tr ',' '\n' |
         tr -d ' ' | grep '+cpu$' | head -n 1) ;;
  esac
  if [ -n "$pick" ]; then
    echo "torch: no NVIDIA GPU found, installing the CPU build torch $pick (~200 MB, not the ~5.5 GB CUDA build)"
    # shellcheck disable=SC2086 # $from holds two pip arguments or none
    pip_install "torch==$pick" $from
  else
    echo "torch: no NVIDIA GPU found, installing the CPU build (~200 MB, not the ~5.5 GB CUDA build)"
    pip_install "torch>=2.11" --index-url "$cpu_index"
  fi
fi
extras=${FASTTUNE_EXTRAS-dev}
pip_install -e ".${extras:+[$extras]}"  # FASTTUNE_EXTRAS="": ".", as pip refuses ".[]"
python -c "import torch; print('installed fasttune with torch', torch.__version__, torch.version.cuda and 'CUDA ' + torch.version.cuda or 'CPU build')"
