#!/usr/bin/env bash
# What the web demo's browser test (tests/test_demo_ui_browser.py) needs, installed idempotently:
#   - Debian's chromium (apt), node >= 18 and npm (apt, only if missing);
#   - playwright-core, pinned by tests/browser/package-lock.json (npm ci), told not to download browsers:
#     it drives /usr/bin/chromium.
# Safe to run again: it installs only what is missing or out of date. Runs apt-get through sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
if [ "${#packages[@]}" -gt 0 ]; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  echo "setup_browser: apt-get install ${packages[*]}"
  "${as_root[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 18 ]; then
  echo "setup_browser: node $(node --version) is too old; playwright-core needs node >= 18" >&2
  exit 1
fi

lock=tests/browser/package-lock.json
installed=tests/browser/node_modules/.package-lock.json
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -f "$installed" ] || [ "$lock" -nt "$installed" ]; then
  echo "setup_browser: npm ci in tests/browser"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup_browser: chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), node $(node --version), \
playwright-core $(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version')"
