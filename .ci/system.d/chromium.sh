#!/usr/bin/env bash
# Headless Chromium for the leaderboard page tests (tests/test_leaderboard_page.py): they open the
# built page, read the DOM after its scripts ran and take a screenshot. Debian's package runs
# headless as root; the tests skip with a reason when no browser is found.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "[chromium] found $(command -v "$name")"
    exit 0
  fi
done
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "[chromium] installed $(command -v chromium): $(chromium --version 2>/dev/null || true)"
