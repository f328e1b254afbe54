#!/usr/bin/env bash
# The operations console's browser tests: Debian's chromium and chromium-driver, installed
# when missing (browsers cannot be downloaded otherwise here), then the suite, which fails
# (never skips) without them. Screenshots of every view land in target/tmp/console/.
#   .ci/browser.sh              install if needed, then run the suite
#   .ci/browser.sh --install    install only
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
chromium --version
chromedriver --version

[ "${1:-}" = "--install" ] && exit 0
cargo test --locked -p shopmesh-e2e --test console -- --ignored --test-threads=1
