#!/usr/bin/env bash
# Builds llama.cpp's tools from the llama-cpp-python source distribution (which vendors llama.cpp and its
# convert_hf_to_gguf.py), outside the project, for the peers mode of benchmarks/model.py (README "Against llama.cpp").
# A peer is for benchmarks only: this script never touches the project's .venv or pyproject, and CI does not run it.
# Quirks it handles are those in shared/PEERS.md.
#
#   bash benchmarks/peers/llamacpp.sh [DIR]              # build; default $LLAMA_CPP_DIR, else /work/peers/llamacpp
#   bash benchmarks/peers/llamacpp.sh convert CKPT OUT   # CKPT (Hugging Face layout) → OUT/{bf16,q8_0,q4_k_m}.gguf
#   env: LLAMA_CPP_DIR, LLAMA_CPP_PYTHON_VERSION (0.3.36), PYTHON (python3.11: the local torch 2.13.0+cpu wheel is cp311)
# DIR gets the sdist, its build (DIR/build/bin: llama-bench, llama-quantize, llama-mtmd-cli) and DIR/venv, where the
# converter runs (torch 2.13.0, transformers, the vendored gguf-py). On a CPU with AMX the build is not native: ggml's
# AMX kernels crash Q8_0 and Q4_K_M with SIGILL (ggml-org/llama.cpp#26954), so the ISA flags are named instead.
# Idempotent: a second run reuses what is there. Nice it on a shared machine (the build takes a few minutes).
set -euo pipefail

if [ "${1:-}" = convert ]; then
  ROOT="${LLAMA_CPP_DIR:-/work/peers/llamacpp}"
else
  ROOT="${1:-${LLAMA_CPP_DIR:-/work/peers/llamacpp}}"
fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-python3.11}"
VENV="$ROOT/venv"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(dirname "$VENV")"
SRC="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$ROOT/build/bin"

if [ "${1:-}" = convert ]; then
  CKPT="$(realpath "${2:?usage: llamacpp.sh convert CKPT OUT}")"
  OUT="${3:?usage: llamacpp.sh convert CKPT OUT}"
  [ -x "$BIN/llama-quantize" ] || { echo "no $BIN/llama-quantize: build first (bash $0)" >&2; exit 2; }
  mkdir -p "$OUT"
  # the converter wants the tokenizer beside the weights; a random checkpoint has none (same vocabulary as ours)
  STAGE="$OUT/checkpoint"
  mkdir -p "$STAGE"
  for f in "$CKPT"/*; do ln -sfn "$f" "$STAGE/$(basename "$f")"; done
  for f in "$REPO"/examples/model/tokenizer*.json; do
    [ -e "$CKPT/$(basename "$f")" ] || ln -sfn "$f" "$STAGE/$(basename "$f")"
  done
  if [ ! -s "$OUT/bf16.gguf" ]; then
    say "convert_hf_to_gguf.py --outtype bf16"
    "$VPY" "$SRC/convert_hf_to_gguf.py" "$STAGE" --outtype bf16 --outfile "$OUT/bf16.gguf.partial"
    mv "$OUT/bf16.gguf.partial" "$OUT/bf16.gguf"
  fi
  for q in Q8_0 Q4_K_M; do
    lower="$(printf '%s' "$q" | tr 'A-Z' 'a-z')"
    if [ ! -s "$OUT/$lower.gguf" ]; then
      say "llama-quantize $q (Q4_K_M takes minutes on the 3B shape)"
      "$BIN/llama-quantize" "$OUT/bf16.gguf" "$OUT/$lower.gguf.partial" "$q" "$(nproc)"
      mv "$OUT/$lower.gguf.partial" "$OUT/$lower.gguf"
    fi
  done
  ls -l "$OUT"/*.gguf
  exit 0
fi

if [ ! -d "$SRC" ]; then
  say "downloading the llama-cpp-python $VERSION sdist (it vendors llama.cpp)"
  "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$ROOT"
  tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi

if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-quantize" ] || [ ! -x "$BIN/llama-mtmd-cli" ]; then
  ISA=(-DGGML_NATIVE=ON)
  if grep -qw amx_tile /proc/cpuinfo; then
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON
         -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  fi
  say "cmake ${ISA[*]}"
  cmake -S "$SRC" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF "${ISA[@]}"
  cmake --build "$ROOT/build" --target llama-bench llama-quantize llama-mtmd-cli
fi

ensure_venv
if ! "$VPY" -c "import torch, transformers, gguf, sentencepiece" 2>/dev/null; then
  say "the converter's venv: torch 2.13.0 (the local CPU wheel), transformers, the vendored gguf-py"
  "$VPY" -m pip install --upgrade pip
  "$VPY" -m pip install "torch==2.13.0" transformers sentencepiece protobuf "$SRC/gguf-py"
fi
"$VPY" -c "import torch; assert not torch.version.cuda, torch.__version__"

"$BIN/llama-bench" --help | head -1 || true
cat <<MSG

== llama.cpp tools are in $BIN. Convert a checkpoint and benchmark it beside ours:
  bash $0 convert CKPT OUT
  .venv/bin/python -m benchmarks.model --peers --llama-cpp $ROOT
MSG
