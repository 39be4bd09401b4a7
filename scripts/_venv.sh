# Sourced by scripts/demo and scripts/test: make .venv, install shmq into it
# (with the extras named in SHMQ_EXTRAS) when missing or when its build inputs
# changed, and rebuild the C extension in place when its sources changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
extras="${SHMQ_EXTRAS:-}"
stamp="$VENV/.shmq-install-stamp"
want="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16) extras=[$extras]"
if [ ! -f "$stamp" ] || ! grep -qF -- "$want" "$stamp"; then
  echo "==> installing shmq${extras:+[$extras]} into $VENV (log: $VENV/install.log)"
  if ! { "$VPY" -m pip install --upgrade pip setuptools wheel &&
         "$VPY" -m pip install -e ".${extras:+[$extras]}"; } > "$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log" >&2
    echo "scripts: installing shmq failed; the whole log is $VENV/install.log" >&2
    exit 1
  fi
  echo "$want" >> "$stamp"
fi
# Editable installs build the extension once; rebuild it when the C sources change.
if ! "$VPY" setup.py -q build_ext --inplace > "$VENV/build.log" 2>&1; then
  cat "$VENV/build.log" >&2
  echo "scripts: building the C extension failed (needs gcc and the Python headers)" >&2
  exit 1
fi
