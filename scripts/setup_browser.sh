#!/usr/bin/env bash
# Install what the web demo's tests need: Debian's chromium (with apt-get, if it is missing) and
# the demo's and the browser test's Python packages (gradio, gradio_client, playwright) into .venv.
# Playwright drives /usr/bin/chromium; it never downloads a browser of its own (no `playwright install`).
#   DEMO_EXTRAS  the pip extras to install (default: demo,browser)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[${DEMO_EXTRAS:-demo,browser}]"
if ! .venv/bin/python -c "import gradio, gradio_client, playwright" 2>/dev/null; then
  echo "setup_browser.sh: gradio, gradio_client or playwright is still missing; pyproject.toml should" \
       "declare them in the extras ${DEMO_EXTRAS:-demo,browser}." >&2
  exit 1
fi
echo "browser tests ready: $(chromium --version 2>/dev/null | head -1), $(.venv/bin/python -c \
  'import gradio, importlib.metadata as m; print("gradio", gradio.__version__, "playwright", m.version("playwright"))')"
