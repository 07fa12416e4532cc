#!/usr/bin/env bash
# The whole test suite, from a clean clone: makes .venv, installs, runs ruff and pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
