"""Tests of deploy/ (systemd units, example settings) and docs/operations.md against the
binary: every flag and environment variable they name must exist in `tokenfab ... --help`,
the settings files must give each process only its own flags, and the units must pass
`systemd-analyze verify` without a warning about their own lines (when systemd-analyze is
installed). The binary is the newest of target/debug/tokenfab and target/release/tokenfab
(or $TOKENFAB_BIN); without one, the flag tests are skipped.

Run: .venv/bin/python -m pytest tests/deploy -q
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("tokenfab-*.*"))
OPERATIONS = ROOT / "docs" / "operations.md"

# Flags of other programs that the operations guide shows (kubectl, helm, useradd, install,
# systemctl, base64, find): everything else written --like-this must be tokenfab's.
OTHER_PROGRAMS_FLAGS = {
    "--namespace", "--create-namespace", "--server-side", "--ignore-daemonsets",
    "--delete-emptydir-data", "--field-selector", "--replicas", "--system", "--no-create-home",
    "--shell", "--now", "--help", "--set-file",
    # vLLM's, in what the operator changes in an engine Deployment.
    "--tensor-parallel-size",
    # cargo's (building tokenfab with the etcd backend).
    "--features",
}


def tokenfab_binary() -> pathlib.Path | None:
    found = [pathlib.Path(os.environ["TOKENFAB_BIN"])] if os.environ.get("TOKENFAB_BIN") else []
    found += [ROOT / "target" / d / "tokenfab" for d in ("debug", "release")]
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


needs_binary = pytest.mark.skipif(tokenfab_binary() is None, reason="no tokenfab binary built (target/debug or target/release)")

COMMANDS = [
    "server", "agent", "admin node-token", "admin hash-token", "admin backup", "admin restore",
    "admin verify", "admin compact", "admin members", "usage", "sla", "tuning", "submit", "results", "devices",
    "sim sweep", "sim gather",
]


# Subcommands of the Kubernetes operator's own binary that the guide shows.
OPERATOR_COMMANDS = ["operator run", "operator derive"]


def operator_binary() -> pathlib.Path | None:
    found = [ROOT / "target" / d / "tokenfab-operator" for d in ("debug", "release")]
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


@functools.lru_cache(maxsize=None)
def help_of(command: str) -> str:
    binary, words = tokenfab_binary(), command.split()
    if words[0] == "operator":
        binary, words = operator_binary(), words[1:]
        assert binary is not None, "no tokenfab-operator binary built (cargo build -p tokenfab-kube)"
    out = subprocess.run([str(binary), *words, "--help"], capture_output=True, text=True, timeout=30)
    return out.stdout


def flags_of(command: str) -> set[str]:
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", help_of(command), re.M))


def envs_of(command: str) -> set[str]:
    return set(re.findall(r"\[env: (TOKENFAB_[A-Z_]+)", help_of(command)))


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments and blank lines
    skipped, one level of quotes removed)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key] = " ".join(shlex.split(value)) if value else ""
    return values


def unknown_in_env_file(path: pathlib.Path, command: str) -> list[str]:
    """Flags (in settings and in comments) and TOKENFAB_* variables of a settings file that
    `tokenfab COMMAND` does not know."""
    text = path.read_text()
    problems = [f for f in sorted(set(re.findall(r"(--[a-z][a-z0-9-]*)", text))) if f not in flags_of(command)]
    for key in read_env_file(path):
        if key.startswith("TOKENFAB_") and key not in envs_of(command) and key != "TOKENFAB_LOG":
            problems.append(key)
    return problems


# ---------------------------------------------------------------------------------------
# Settings files and units against the binary


@needs_binary
@pytest.mark.parametrize("file, command", [("server.env", "server"), ("agent.env", "agent"), ("backup.env", "admin backup")])
def test_settings_files_name_only_flags_and_variables_the_binary_has(file, command):
    assert unknown_in_env_file(DEPLOY / "config" / file, command) == []
    assert "TOKENFAB_LOG" in envs_of(command)


@needs_binary
@pytest.mark.parametrize("unit", [u.name for u in UNITS if u.suffix == ".service"])
def test_units_pass_only_known_flags(unit):
    text = (DEPLOY / "systemd" / unit).read_text().replace("\\\n", " ")
    (exec_start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    command = "admin backup" if "admin backup" in exec_start else exec_start.split()[1]
    flags = set(re.findall(r"\s(--[a-z][a-z0-9-]*)", exec_start)) | set(re.findall(r"\s(-o)\s", exec_start))
    assert flags, exec_start
    assert {f for f in flags if f != "-o"} <= flags_of(command)
    for key in re.findall(r"^Environment=(TOKENFAB_[A-Z_]+)=", text, re.M):
        assert key in envs_of(command), key


@needs_binary
def test_operations_guide_names_only_flags_that_exist():
    text = OPERATIONS.read_text()
    known = set().union(*(flags_of(c) for c in COMMANDS + OPERATOR_COMMANDS))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)) - OTHER_PROGRAMS_FLAGS
    assert sorted(named - known) == []
    # Every `tokenfab SUBCOMMAND` the guide shows exists.
    for sub in set(re.findall(r"`tokenfab ([a-z-]+)", text)) | set(re.findall(r"^\s*tokenfab ([a-z-]+)", text, re.M)):
        assert subprocess.run([str(tokenfab_binary()), sub, "--help"], capture_output=True, timeout=30).returncode == 0, sub


def test_settings_files_parse_and_keep_secrets_out():
    for path in sorted((DEPLOY / "config").glob("*.env")):
        values = read_env_file(path)
        assert values, path
        for key, value in values.items():
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}: {key}"
            assert not re.search(r"--(agent-token|admin-token|tenant|token)=", value), f"{path.name}: {key} holds a secret"


def test_ports_agree_with_the_chart():
    chart = yaml.safe_load((ROOT / "charts" / "tokenfab" / "values.yaml").read_text())
    server = read_env_file(DEPLOY / "config" / "server.env")
    agent = read_env_file(DEPLOY / "config" / "agent.env")
    assert f"--listen=0.0.0.0:{chart['controlPlane']['ports']['grpc']}" in server["LISTEN_FLAGS"]
    assert f"--metrics-listen=0.0.0.0:{chart['controlPlane']['ports']['http']}" in server["LISTEN_FLAGS"]
    assert agent["TOKENFAB_AGENT_METRICS_LISTEN"].endswith(f":{chart['agent']['metricsPort']}")


def test_the_agent_unit_outlasts_the_request_timeout():
    unit = (DEPLOY / "systemd" / "tokenfab-agent.service").read_text()
    (stop,) = re.findall(r"^TimeoutStopSec=(\d+)min$", unit, re.M)
    assert int(stop) * 60 > 600, "the agent drains its running requests (--request-timeout, 10m by default)"


# ---------------------------------------------------------------------------------------
# systemd-analyze verify


def verify_units(units: list[pathlib.Path], tmp_path: pathlib.Path) -> str:
    """systemd-analyze verify's complaints about the units' own lines. The units name
    /usr/local/bin/tokenfab, which verify requires to exist: copies name the built binary."""
    binary = tokenfab_binary() or pathlib.Path("/bin/true")
    copies = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/tokenfab", str(binary)))
        copies.append(str(copy))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *copies], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    complaints = []
    for line in (out.stdout + out.stderr).splitlines():
        # A system-call group may name calls this libseccomp does not know (harmless).
        if "Failed to parse system call, ignoring" in line:
            continue
        if str(tmp_path) in line or line.startswith("tokenfab-"):
            complaints.append(line)
    if out.returncode != 0:
        complaints.append(f"exit status {out.returncode}")
    return "\n".join(complaints)


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    assert verify_units(UNITS, tmp_path) == ""


@needs_systemd_analyze
def test_planted_misspelled_unit_setting_is_caught(tmp_path):
    broken = tmp_path / "src"
    broken.mkdir()
    unit = broken / "tokenfab-server.service"
    unit.write_text((DEPLOY / "systemd" / "tokenfab-server.service").read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    out = tmp_path / "out"
    out.mkdir()
    assert "Unknown key 'ProtectSytem'" in verify_units([unit], out)


@needs_binary
def test_planted_misspelled_flag_in_settings_is_caught(tmp_path):
    broken = tmp_path / "server.env"
    broken.write_text((DEPLOY / "config" / "server.env").read_text().replace("--min-free-space=1GiB", "--min-free-spce=1GiB"))
    assert unknown_in_env_file(broken, "server") == ["--min-free-spce"]
