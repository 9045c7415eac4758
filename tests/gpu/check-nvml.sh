#!/usr/bin/env bash
# Checks tokenfab's NVML device backend on a machine with NVIDIA GPUs and prints what it
# read, beside nvidia-smi's view of the same GPUs. Read-only: it changes no GPU setting
# (no power limit, clock or mode is set).
#
#   tests/gpu/check-nvml.sh [path/to/tokenfab]     # default: target/release/tokenfab
#
# Fails when the backend cannot open NVML, finds no GPU, or reads an energy counter that
# does not rise, or a power draw outside the device's range by more than 10%.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/tokenfab}
[ -x "$BIN" ] || { echo "no tokenfab binary at $BIN: build it with cargo build --release -p tokenfab" >&2; exit 1; }

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,name,uuid,memory.total,power.draw,power.limit,power.min_limit,power.max_limit,utilization.gpu,temperature.gpu --format=csv || echo "(nvidia-smi not available)"
nvidia-smi topo -m 2>/dev/null | head -20 || true

echo "== tokenfab devices (text)"
"$BIN" devices --samples 3 --interval 1s

echo "== tokenfab devices (JSON), checked"
"$BIN" devices --samples 4 --interval 1s --json > /tmp/tokenfab-devices.json
python3 - /tmp/tokenfab-devices.json <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
devs = {d["index"]: d for d in doc["devices"]}
assert devs, "no GPU"
bad = []
for d in devs.values():
    rs = [r for r in doc["readings"] if r["index"] == d["index"]]
    e = [r["energy_j"] for r in rs]
    if not all(b > a for a, b in zip(e, e[1:])):
        bad.append(f"GPU {d['index']}: energy counter did not rise: {e}")
    for r in rs:
        if not (0 < r["power_w"] <= 1.1 * d["power_limit_max_w"]):
            bad.append(f"GPU {d['index']}: power {r['power_w']} W outside (0, {1.1 * d['power_limit_max_w']}]")
    means = [r["mean_power_w_since_last"] for r in rs if r["mean_power_w_since_last"] is not None]
    print(f"GPU {d['index']} {d['accelerator']} domain {d['nvlink_domain']}: "
          f"power {[round(r['power_w'], 1) for r in rs]} W, mean power from the energy counter "
          f"{[round(m, 1) for m in means]} W, limit {d['power_limit_w']} W "
          f"({d['power_limit_min_w']}-{d['power_limit_max_w']} W)")
if bad:
    sys.exit("\n".join(bad))
print("OK: every GPU read, energy counters rising, power within range")
PY
