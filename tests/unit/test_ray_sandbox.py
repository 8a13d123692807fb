"""The sandbox's pure parts (commands, environments, config) and its process tracking."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from llmray import sandbox
from llmray.sandbox import (
    SandboxConfig,
    SandboxError,
    ensure_token,
    env_script,
    find_repo,
    operator_command,
    operator_env,
    our_session,
    ray_env,
    ray_start_command,
    serve_instance_options,
    session_pids,
    start_detached,
    stop_session,
    tracked_pid,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def cfg(tmp_path: Path) -> SandboxConfig:
    return SandboxConfig(repo=tmp_path)


def test_config_defaults_and_env_overrides(tmp_path: Path) -> None:
    default = SandboxConfig.from_env(tmp_path, env={})
    assert (default.dashboard_port, default.serve_port, default.gcs_port) == (8265, 8000, 6379)
    assert default.dashboard_url == "http://127.0.0.1:8265"
    assert default.serve_url == "http://127.0.0.1:8000"
    assert default.state == tmp_path / ".cache" / "sandbox"
    moved = SandboxConfig.from_env(
        tmp_path, env={"LLMRAY_SANDBOX_DASHBOARD_PORT": "9265", "LLMRAY_SANDBOX_NUM_CPUS": "4"}
    )
    assert moved.dashboard_url == "http://127.0.0.1:9265" and moved.num_cpus == 4


def test_ray_temp_is_short_and_per_checkout(tmp_path: Path) -> None:
    a, b = SandboxConfig(repo=tmp_path / "a"), SandboxConfig(repo=tmp_path / "b")
    assert a.ray_temp != b.ray_temp
    assert len(str(a.ray_temp)) < 40  # Ray's socket paths live below it (limit ~107 chars)


def test_ray_start_command_binds_loopback_and_blocks(cfg: SandboxConfig) -> None:
    cmd = ray_start_command(cfg, client_port=12345, agent_port=23456)
    assert cmd[0].endswith("ray") and cmd[1:4] == ["start", "--head", "--block"]
    assert "--node-ip-address=127.0.0.1" in cmd
    assert "--dashboard-host=127.0.0.1" in cmd
    assert "--dashboard-port=8265" in cmd and "--port=6379" in cmd
    assert "--ray-client-server-port=12345" in cmd
    assert "--dashboard-agent-listen-port=23456" in cmd
    assert "--dashboard-agent-listen-port=52365" in ray_start_command(cfg)
    assert f"--temp-dir={cfg.ray_temp}" in cmd
    assert "--num-gpus=0" in cmd


def test_ray_env_turns_token_auth_on_and_keeps_loopback() -> None:
    env = ray_env("tok", {"PATH": "/usr/bin", "HOME": "/root"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "tok"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["PATH"].startswith(str(Path(sys.executable).parent) + os.pathsep)
    assert env["HOME"] == "/root"


def test_serve_listens_on_loopback(cfg: SandboxConfig) -> None:
    assert serve_instance_options(cfg) == {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "proxy_location": "HeadOnly",
    }


def test_operator_env_and_command(cfg: SandboxConfig) -> None:
    kc = Path("/k/kubeconfig")
    env = operator_env(kc, {"PATH": "/bin", "LLMRAY_RAY_DASHBOARD_URL": "http://stale:1"})
    assert env["KUBECONFIG"] == "/k/kubeconfig"
    cmd = operator_command(cfg, kc)
    assert cmd[:4] == [sys.executable, "-m", "llmray.cli", "operator"]
    assert "--all-namespaces" in cmd

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag("--ray-dashboard-url") == "http://127.0.0.1:8265"
    assert flag("--ray-serve-url") == "http://127.0.0.1:8000"
    assert flag("--ray-token-file") == str(cfg.token_file)
    assert "s3cret" not in " ".join(cmd)  # the token never sits in argv (ps shows it)
    # The shared-head topology the operator builds from exactly these flags:
    from llmray.cli import build_parser, settings_from_args
    from llmray.controllers.topology import SharedHead

    cfg.state.mkdir(parents=True, exist_ok=True)
    cfg.token_file.write_text("s3cret\n")
    settings = settings_from_args(build_parser().parse_args(cmd[3:]), {})
    assert settings.topology == SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000", "s3cret")


def test_env_script_holds_no_secret(cfg: SandboxConfig) -> None:
    cfg.state.mkdir(parents=True)
    token = ensure_token(cfg)
    script = env_script(cfg, Path("/k/kubeconfig"), Path("/bins"))
    assert token not in script
    assert f"$(cat {cfg.token_file})" in script
    assert "export KUBECONFIG=/k/kubeconfig" in script and 'export PATH="/bins:$PATH"' in script


def test_token_is_private_and_stable(cfg: SandboxConfig) -> None:
    token = ensure_token(cfg)
    assert len(token) == 64
    assert stat.S_IMODE(cfg.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.state.stat().st_mode) == 0o700
    assert ensure_token(cfg) == token


def test_find_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tests" / "cluster").mkdir(parents=True)
    (tmp_path / "tests" / "cluster" / "cluster.sh").write_text("")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.delenv("LLMRAY_REPO", raising=False)
    assert find_repo(tmp_path / "deep" / "er") == tmp_path
    monkeypatch.setenv("LLMRAY_REPO", "/somewhere")
    assert find_repo() == Path("/somewhere")


def test_find_repo_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMRAY_REPO", raising=False)
    monkeypatch.setattr(sandbox, "__file__", str(tmp_path / "x.py"))
    with pytest.raises(SandboxError, match="no llmray checkout"):
        find_repo(tmp_path)


def test_pid_files_that_are_not_ours_are_ignored(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    assert tracked_pid(pid_file, "m") is None  # missing
    pid_file.write_text("garbage")
    assert tracked_pid(pid_file, "m") is None
    pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a session leader with the marker
    assert tracked_pid(pid_file, "no-such-marker") is None
    assert our_session(pid_file, "no-such-marker") is None
    assert stop_session(pid_file, "no-such-marker", "nothing") is False


def test_detached_process_is_tracked_and_stopped_with_its_children(tmp_path: Path) -> None:
    marker = f"llmray-sandbox-test-{os.getpid()}"
    # A parent that starts a child in its own process group, like raylet starting Ray actors.
    code = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], process_group=0);"
        f"time.sleep(600)  # {marker}"
    )
    pid_file = tmp_path / "p.pid"
    proc = start_detached(
        [sys.executable, "-c", code], dict(os.environ), tmp_path / "p.log", pid_file, tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while len(session_pids(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the child needs a moment to start
        assert len(session_pids(proc.pid)) == 2
        assert tracked_pid(pid_file, marker) == proc.pid
        assert stop_session(pid_file, marker, "test process", grace_s=10) is True
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # the orphaned child is reaped by init
        assert session_pids(proc.pid) == []
        assert not pid_file.exists()
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, 9)
