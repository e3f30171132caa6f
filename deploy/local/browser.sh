#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser test (tests/e2e/test_dashboard.py drives it with Playwright's
# Python client through executable_path; Playwright's own browser download is never used).
#
#   deploy/local/browser.sh      install chromium with apt-get when /usr/bin/chromium is missing
set -euo pipefail

CHROMIUM="${BILLING_CHROMIUM:-/usr/bin/chromium}"
log() { printf '[browser] %s\n' "$*"; }

if [ -x "$CHROMIUM" ]; then
  log "chromium present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
log "installing chromium (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
log "installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
