# Sourced by the scripts: makes .venv (once) and installs the project into it, again only
# when setup.py or pyproject.toml change (the install is editable: source edits need none).
# REINSTALL=1 forces the install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/installed.sha256  # the packaging files' hash at the last install
PACKAGING=$(.venv/bin/python -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(p, "rb").read() for p in sys.argv[1:])).hexdigest())' \
  setup.py pyproject.toml)
if [ "${REINSTALL:-0}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$PACKAGING" ]; then
  rm -f "$STAMP"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$PACKAGING" > "$STAMP"
fi
