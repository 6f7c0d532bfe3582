#!/usr/bin/env bash
# Set up a virtual environment with every extra and run the test suite.
# System packages: headless Chromium for the browser tests (installed with apt when missing and
# running as root; otherwise install Debian's 'chromium' yourself or set IMGCLF_NO_BROWSER=1).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
exec .venv/bin/python -m pytest -q "$@"
