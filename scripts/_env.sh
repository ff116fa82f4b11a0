# Shared by scripts/serve and scripts/test: make .venv and install the project into it.
# Usage: source scripts/_env.sh EXTRAS   (EXTRAS: "" or "test" or "test,bench")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# Re-install only when the project's metadata or native sources changed since the last install.
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')"
hash="$(cat pyproject.toml setup.py engine/*.c engine/*.h 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; then
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet -e "$spec"
  echo "$hash" > "$stamp"
fi
