# Sourced by the peer scripts: resolves VENV to an absolute path outside the project (peers never live in it) and
# defines `say` and `ensure_venv` (creates VENV with $PY when missing). Needs VENV and PY set; sets HERE, REPO, VPY.
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
case "$VENV/" in
  "$REPO"/*) echo "refusing: $VENV is inside the project ($REPO); peers live outside it" >&2; exit 2 ;;
esac

say() { printf '\n== %s\n' "$*"; }

VPY="$VENV/bin/python"

ensure_venv() {
  if [ ! -x "$VPY" ]; then
    say "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  unset PIP_REQUIRE_VIRTUALENV VIRTUAL_ENV || true
}
