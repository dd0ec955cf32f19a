#!/usr/bin/env bash
# Best effort: Debian's chromium for the plugin's end-to-end browser test. Without it that test skips.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "install-browser: could not install chromium; the browser test will skip"
else
  echo "install-browser: not root or no apt-get; the browser test will skip unless chromium is installed"
fi
