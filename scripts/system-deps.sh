#!/usr/bin/env bash
# Debian packages the full test suite needs: chromium (browser e2e), postgresql (real catalog server), and the GL
# and GLib libraries OpenCV needs (OCR tests).
# Installs only what is missing; needs root (CI runs as root). Safe to run repeatedly.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
ldconfig -p | grep -q 'libGL.so.1 ' || need+=(libgl1)  # OpenCV (RapidOCR, the [ocr] extra) links against it
ldconfig -p | grep -q 'libglib-2.0.so.0 ' || need+=(libglib2.0-0)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: please install: ${need[*]} (needs root and apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
