#!/usr/bin/env bash
# Installs evalscope with its VLMEvalKit backend (PyPI `evalscope[vlmeval]`, which brings `ms-vlmeval`) in a virtual
# environment of its own, outside the project, to show that a client's evaluation tool drives `launch.py serve`
# unchanged (README "evalscope"). A peer is for benchmarks only: this script never touches the project's .venv or
# pyproject, and CI does not run it.
#
#   bash benchmarks/peers/evalscope.sh [VENV]        # install; default $EVALSCOPE_VENV, else /work/peers/evalscope-venv
#   env: EVALSCOPE_VENV, EVALSCOPE_VERSION (1.14.1), MS_VLMEVAL_VERSION (0.0.19),
#        PYTHON (python3.11: the local torch 2.13.0+cpu wheel is cp311)
#
#   bash benchmarks/peers/evalscope.sh run TSV [N]   # evaluate a running `launch.py serve` on TSV's first N rows (100)
#   env: EVALSCOPE_API (http://127.0.0.1:8000/v1), EVALSCOPE_MODEL (model), EVALSCOPE_WORK (/work/peers/evalscope-work),
#        EVALSCOPE_DATASET (heldout_mcq: the name the TSV is registered under in $EVALSCOPE_WORK/LMUData)
# `run` is evalscope's VLMEvalKit backend with its CustomAPIModel (VLMEvalKit's OpenAI client, which posts
# /v1/chat/completions with the image as a JPEG data URI) at temperature 0, on a TSV in the MMBench layout taken as
# a custom MCQ dataset (VLMEvalKit's build_dataset: an unknown name found as $LMUData/NAME.tsv with columns A, B and
# image), scored by exact matching of the option letter, no judge model.
#
# ms-vlmeval needs torch and torchvision unpinned: torch 2.13.0 (the CPU wheel pip finds locally) goes in first and a
# constraints file holds it there, so nothing pulls another torch and its CUDA wheels.
# ms-vlmeval 0.0.20, the newest, cannot be installed beside evalscope 1.14.1: it pins antlr4-python3-runtime==4.11.1
# while evalscope pins math-verify[antlr4_13_2]==0.9.0 (antlr4-python3-runtime==4.13.2); pip backtracks for minutes
# and dies building an ancient `dotenv` sdist. 0.0.19 pins no antlr4 and satisfies evalscope's ms-vlmeval>=0.0.17.
# Idempotent: a second run reuses the venv. Nice it on a shared machine (about 10 minutes on 2 cores).
set -euo pipefail

if [ "${1:-}" = run ]; then
  VENV="${EVALSCOPE_VENV:-/work/peers/evalscope-venv}"
else
  VENV="${1:-${EVALSCOPE_VENV:-/work/peers/evalscope-venv}}"
fi
VERSION="${EVALSCOPE_VERSION:-1.14.1}"
VLMEVAL_VERSION="${MS_VLMEVAL_VERSION:-0.0.19}"
PY="${PYTHON:-python3.11}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "${1:-}" = run ]; then
  TSV="${2:?usage: evalscope.sh run TSV [N]}"
  N="${3:-100}"
  API="${EVALSCOPE_API:-http://127.0.0.1:8000/v1}"
  MODEL="${EVALSCOPE_MODEL:-model}"
  WORK="${EVALSCOPE_WORK:-/work/peers/evalscope-work}"
  NAME="${EVALSCOPE_DATASET:-heldout_mcq}"
  [ -x "$VENV/bin/evalscope" ] || { echo "no $VENV/bin/evalscope: install first (bash $0)" >&2; exit 2; }
  # VLMEvalKit scores a dataset whose name contains mmbench, ccbench or circular as CircularEval (rotated options)
  case "$(printf '%s' "$NAME" | tr 'A-Z' 'a-z')" in
    *mmbench*|*ccbench*|*circular*) echo "refusing dataset name $NAME: VLMEvalKit would score it as CircularEval" >&2; exit 2 ;;
  esac
  mkdir -p "$WORK/LMUData"
  ln -sfn "$(realpath "$TSV")" "$WORK/LMUData/$NAME.tsv"
  # VLMEvalKit keeps the images it decoded from a TSV under LMUData/images/NAME and reuses them by index: a TSV
  # registered under a name used before would be asked about the old images
  rm -rf "$WORK/LMUData/images/$NAME" "$WORK/outputs"
  cat > "$WORK/vlmeval.yaml" <<EOF
model:
  - name: CustomAPIModel
    type: $MODEL
    api_base: ${API%/}/chat/completions
    key: EMPTY
    temperature: 0.0
    max_tokens: 64
    img_size: -1
data:
  - $NAME
mode: all
limit: $N
judge: exact_matching
nproc: 4
reuse: false
EOF
  say "evalscope eval --eval-backend VLMEvalKit --eval-config $WORK/vlmeval.yaml"
  cat "$WORK/vlmeval.yaml"
  LMUData="$WORK/LMUData" "$VENV/bin/evalscope" eval --eval-backend VLMEvalKit --eval-config "$WORK/vlmeval.yaml" \
    --work-dir "$WORK/outputs" --no-timestamp
  say "accuracy (VLMEvalKit's ${MODEL}_${NAME}_acc.csv)"
  find "$WORK/outputs" -name "*_${NAME}_acc.csv" -exec cat {} \;
  exit 0
fi

ensure_venv

CONSTRAINTS="$VENV/torch-constraints.txt"
# transformers 5 dropped AutoModelForVision2Seq, which vlmeval 0.0.19 imports at start-up (vlmeval/vlm/granite_vision)
printf 'torch==2.13.0\ntransformers<5\n' > "$CONSTRAINTS"

have() { "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(not m.version('torch').startswith('2.13.0'))" 2>/dev/null; then
  say "pip install torch==2.13.0 (the local CPU wheel)"
  "$VPY" -m pip install --upgrade pip
  "$VPY" -m pip install "torch==2.13.0"
fi

if ! have evalscope "$VERSION" || ! have ms-vlmeval "$VLMEVAL_VERSION" \
   || ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(int(m.version('transformers').split('.')[0]) >= 5)"; then
  say "pip install evalscope[vlmeval]==$VERSION ms-vlmeval==$VLMEVAL_VERSION (torch held at 2.13.0, transformers below 5)"
  "$VPY" -m pip install -c "$CONSTRAINTS" "evalscope[vlmeval]==$VERSION" "ms-vlmeval==$VLMEVAL_VERSION"
fi

say "patching torchvision's meta registrations (PyPI's wheel is a CUDA build without the nms/qnms ops)"
"$VPY" "$HERE/patch_torchvision.py"

say "check"
"$VPY" - <<'PYEOF'
import importlib.metadata as m
for name in ("evalscope", "ms-vlmeval", "torch", "torchvision", "transformers", "openai"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} missing")
import torch
assert not torch.version.cuda, f"a CUDA torch came in: {torch.__version__}"
from evalscope.backend.vlm_eval_kit import VLMEvalKitBackendManager
VLMEvalKitBackendManager.list_supported_datasets()  # imports vlmeval.dataset, and with it torchvision
print("evalscope's VLMEvalKit backend and vlmeval.dataset import")
PYEOF
echo "ready: $VENV/bin/evalscope"
