#!/usr/bin/env bash
# Set up what `promptcontrol app` and its tests need, on top of scripts/setup.sh: the package's [app] extra
# (Gradio), selenium for the real-browser test, and Debian's chromium + chromium-driver when missing.
# Quick when everything is there. Without root or apt-get, the browser step is skipped with a note (the
# browser test then skips itself, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
quiet() { grep -v "is ignored" || true; }
installed() {  # gradio (at the [app] extra's bound) and selenium already importable: nothing to install
    .venv/bin/python - <<'PY' 2>/dev/null
from importlib.metadata import version
import selenium  # noqa: F401
major, minor = (int(x) for x in version("gradio").split(".")[:2])
raise SystemExit(0 if (major, minor) >= (6, 31) else 1)
PY
}
installed || .venv/bin/python -m pip install -q -e ".[app]" "selenium>=4.20" 2>&1 | quiet
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "setup_app: no chromium/chromedriver and no root apt-get: the browser test will skip" >&2
    fi
fi
.venv/bin/python -c "import gradio, selenium; print('gradio', gradio.__version__, '| selenium', selenium.__version__)"
command -v chromium >/dev/null && chromium --version 2>/dev/null | head -1 || true
