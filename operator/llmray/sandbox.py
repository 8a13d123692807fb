"""The local sandbox: a real control plane, one real local Ray head and the operator, on loopback.

``llmray sandbox up|down|status`` (or ``python -m llmray.sandbox up``) from a repository checkout:

1. the control plane: ``tests/cluster/cluster.sh up`` (etcd, kube-apiserver, controller-manager,
   scheduler; kwok simulates nodes and marks pods Running), kubeconfig in
   ``.cache/sandbox/cluster`` (apart from the test tiers' ``.cache/cluster``);
2. one Ray head on 127.0.0.1 with token auth (token in ``.cache/sandbox/ray-token``, mode 600),
   dashboard on :8265 and Serve HTTP on 127.0.0.1:8000, run as ``ray start --block`` in its own
   process group so ``down`` stops exactly this head (never ``ray stop``, which kills every Ray
   on the machine);
3. the CRDs from ``crds/`` applied with the pinned kubectl;
4. the operator, ``python -m llmray.cli operator --all-namespaces``, in the shared-head topology
   (``--ray-dashboard-url``/``--ray-serve-url`` without placeholders, ``--ray-token-file``) so the
   auth Secret of every resource carries the shared head's token.

Pods are simulated, so every resource's Ray work runs in the one local head. State, logs and pid
files live in ``.cache/sandbox``; ``up`` is idempotent (running parts are kept), ``down`` removes
everything it started. Ports move with ``LLMRAY_SANDBOX_{DASHBOARD,SERVE,GCS,CLIENT,AGENT}_PORT``, the
head's logical CPUs with ``LLMRAY_SANDBOX_NUM_CPUS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmray.cli import DASHBOARD_URL_ENV, SERVE_URL_ENV
from llmray.ray import RayClient, RayError

LOOPBACK = "127.0.0.1"
OPERATOR_MARKER = "llmray.cli"
RAY_START_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


class SandboxError(RuntimeError):
    """A sandbox step failed; the message says which and where its log is."""


def _log(message: str) -> None:
    print(f"[sandbox] {message}", file=sys.stderr, flush=True)


def find_repo(start: Path | None = None) -> Path:
    """The checkout the sandbox runs from: ``$LLMRAY_REPO``, else the first folder upwards from
    ``start`` (default: cwd, then this package's location) holding ``tests/cluster/cluster.sh``."""
    if os.environ.get("LLMRAY_REPO"):
        return Path(os.environ["LLMRAY_REPO"]).resolve()
    for base in (start or Path.cwd(), Path(__file__).resolve()):
        for folder in (base, *base.parents):
            if (folder / "tests" / "cluster" / "cluster.sh").is_file():
                return folder
    raise SandboxError(
        "no llmray checkout found (tests/cluster/cluster.sh); run from the repo or set LLMRAY_REPO"
    )


@dataclass(frozen=True)
class SandboxConfig:
    """Where the sandbox keeps its state and which ports it uses."""

    repo: Path
    dashboard_port: int = 8265
    serve_port: int = 8000
    gcs_port: int = 6379
    client_port: int = 10001
    agent_port: int = 52365
    num_cpus: int = 8
    object_store_bytes: int = 1 << 30

    @classmethod
    def from_env(cls, repo: Path, env: Mapping[str, str] | None = None) -> SandboxConfig:
        env = os.environ if env is None else env

        def num(key: str, default: int) -> int:
            return int(env.get(f"LLMRAY_SANDBOX_{key}", default))

        return cls(
            repo=repo,
            dashboard_port=num("DASHBOARD_PORT", 8265),
            serve_port=num("SERVE_PORT", 8000),
            gcs_port=num("GCS_PORT", 6379),
            client_port=num("CLIENT_PORT", 10001),
            agent_port=num("AGENT_PORT", 52365),
            num_cpus=num("NUM_CPUS", 8),
        )

    @property
    def state(self) -> Path:
        return self.repo / ".cache" / "sandbox"

    @property
    def token_file(self) -> Path:
        return self.state / "ray-token"

    @property
    def ray_temp(self) -> Path:
        # Outside the checkout: Ray's unix socket paths must stay under ~107 characters.
        digest = hashlib.sha256(str(self.repo).encode()).hexdigest()[:8]
        return Path("/tmp") / f"llmray-sandbox-{digest}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{LOOPBACK}:{self.serve_port}"

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    def pid_file(self, what: str) -> Path:
        return self.state / f"{what}.pid"

    def log_file(self, what: str) -> Path:
        return self.state / f"{what}.log"


# --- pure builders of commands and environments ----------------------------------------------


def ray_env(token: str, base: Mapping[str, str]) -> dict[str, str]:
    """Environment of the Ray head (and so of every job driver and worker it starts)."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **base,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Keep the node on 127.0.0.1: otherwise Ray maps --node-ip-address=127.0.0.1 to the
        # machine's interface address (single-node clusters only; the sandbox has one node).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Job entrypoints say `python`: make it this environment's python, which has the workloads.
        "PATH": venv_bin + os.pathsep + base.get("PATH", ""),
    }


def ray_start_command(
    cfg: SandboxConfig, client_port: int | None = None, agent_port: int | None = None
) -> list[str]:
    """``ray start --head --block`` bound to loopback with the sandbox's fixed ports."""
    return [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={cfg.gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={cfg.dashboard_port}",
        f"--ray-client-server-port={client_port or cfg.client_port}",
        f"--dashboard-agent-listen-port={agent_port or cfg.agent_port}",
        "--include-dashboard=true",
        f"--num-cpus={cfg.num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={cfg.object_store_bytes}",
        f"--temp-dir={cfg.ray_temp}",
        "--disable-usage-stats",
    ]


def serve_instance_options(cfg: SandboxConfig) -> dict[str, object]:
    """Serve's HTTP proxy on loopback, on the head only (the sandbox has no other node)."""
    return {"http_options": {"host": LOOPBACK, "port": cfg.serve_port}, "proxy_location": "HeadOnly"}


def operator_env(kubeconfig: Path, base: Mapping[str, str]) -> dict[str, str]:
    """Environment of the sandboxed operator: the kubeconfig (the topology goes in flags)."""
    return {**base, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}


def operator_command(cfg: SandboxConfig, kubeconfig: Path) -> list[str]:
    """``llmray operator`` in the shared-head topology: the one local head, its token from a file."""
    return [
        sys.executable,
        "-m",
        OPERATOR_MARKER,
        "operator",
        "--all-namespaces",
        "--kubeconfig",
        str(kubeconfig),
        "--ray-dashboard-url",
        cfg.dashboard_url,
        "--ray-serve-url",
        cfg.serve_url,
        "--ray-token-file",
        str(cfg.token_file),
    ]


def env_script(cfg: SandboxConfig, kubeconfig: Path, bin_dir: Path | None) -> str:
    """A shell snippet to explore the sandbox (``source .cache/sandbox/env``); no secret inside."""
    lines = [
        "# source me: kubectl, ray and curl against the llmray sandbox",
        f"export KUBECONFIG={kubeconfig}",
        f"export RAY_ADDRESS={cfg.dashboard_url}",
        "export RAY_AUTH_MODE=token",
        f'export RAY_AUTH_TOKEN="$(cat {cfg.token_file})"',
        f"export {DASHBOARD_URL_ENV}={cfg.dashboard_url}",
        f"export {SERVE_URL_ENV}={cfg.serve_url}",
    ]
    if bin_dir:
        lines.append(f'export PATH="{bin_dir}:$PATH"')
    return "\n".join(lines) + "\n"


# --- processes ---------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tracked_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive, leads its own group and its command line
    contains ``marker`` (so a recycled pid never gets signalled)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        if os.getpgid(pid) != pid:
            return None
    except ProcessLookupError:
        return None
    return pid if marker in _cmdline(pid) else None


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: everything a detached start spawned,
    including Ray's actor workers, which get their own process groups but keep the session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def our_session(pid_file: Path, marker: str) -> int | None:
    """The session recorded in ``pid_file`` if a live member's command line contains ``marker``
    (found even when the leader already exited; a recycled pid never matches)."""
    try:
        sid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return sid if any(marker in _cmdline(p) for p in session_pids(sid)) else None


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def start_detached(
    cmd: Sequence[str], env: Mapping[str, str], log: Path, pid_file: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (own process group), output to ``log``; write its pid."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def stop_session(pid_file: Path, marker: str, what: str, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM every process of the tracked session, SIGKILL what is left after ``grace_s``.

    Signals go to all members at once: ``ray start --block`` alone shuts its children down one by
    one (~30 s here), and Ray's workers are not in its process group. True if anything ran.
    """
    sid = our_session(pid_file, marker)
    pid_file.unlink(missing_ok=True)
    if sid is None:
        return False
    _log(f"stopping {what} (session {sid})")
    _signal_all(session_pids(sid), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_pids(sid):
        time.sleep(0.5)  # bounded wait for processes to exit: there is nothing to subscribe to
    if left := session_pids(sid):
        _log(f"{what}: {len(left)} process(es) left after {grace_s:.0f}s: SIGKILL")
        _signal_all(left, signal.SIGKILL)
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _wait(check: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(cmd: Sequence[str], cwd: Path, timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run a command to completion, its stderr passed through; stdout returned."""
    proc = subprocess.run(
        list(cmd), cwd=cwd, env=dict(env) if env else None, stdout=subprocess.PIPE, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SandboxError(f"{' '.join(cmd)} exited {proc.returncode}")
    return proc.stdout


# --- steps -------------------------------------------------------------------------------------


def ensure_token(cfg: SandboxConfig) -> str:
    """The sandbox head's token (created once, mode 600, in a mode-700 folder)."""
    cfg.state.mkdir(parents=True, exist_ok=True)
    cfg.state.chmod(0o700)
    if cfg.token_file.is_file() and cfg.token_file.read_text().strip():
        return cfg.token_file.read_text().strip()
    token = secrets.token_hex(32)
    fd = os.open(cfg.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def cluster_up(cfg: SandboxConfig) -> tuple[Path, Path | None]:
    """Start (or reuse) the control plane; returns the kubeconfig and the pinned bin dir."""
    script = cfg.repo / "tests" / "cluster" / "cluster.sh"
    if not script.is_file():
        raise SandboxError(f"{script} not found")
    _log("control plane: tests/cluster/cluster.sh up (the first run builds the binaries)")
    _run(["bash", str(script), "up"], cfg.repo, timeout=3600, env=cluster_env(cfg))
    kubeconfig = Path(
        _run(["bash", str(script), "kubeconfig"], cfg.repo, timeout=60, env=cluster_env(cfg)).strip()
    )
    return kubeconfig, bin_dir(cfg)


def cluster_env(cfg: SandboxConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``cluster.sh``: the sandbox's control plane lives in its own folder.

    The test tiers start theirs in ``.cache/cluster``; keeping the two apart means a sandbox left
    running by ``make demo`` (its operator watches every namespace) never sees the tests' objects.
    """
    env = dict(os.environ if base is None else base)
    env["LLMRAY_CLUSTER_DIR"] = str(cfg.state / "cluster")
    return env


def bin_dir(cfg: SandboxConfig) -> Path | None:
    """The pinned kubectl's folder (``build.sh`` prints it; it builds nothing when cached)."""
    build = cfg.repo / "tests" / "cluster" / "build.sh"
    if not build.is_file():
        return None
    out = _run(["bash", str(build)], cfg.repo, timeout=3600).strip().splitlines()
    return Path(out[-1]) if out else None


def _dashboard_answers(cfg: SandboxConfig, token: str) -> bool:
    try:
        response = httpx.get(
            f"{cfg.dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=3
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def _start_serve(cfg: SandboxConfig, token: str) -> bool:
    async with RayClient(cfg.dashboard_url, token) as ray:
        return await ray.serve.start(serve_instance_options(cfg))


def ray_up(cfg: SandboxConfig, token: str) -> None:
    """Start (or reuse) the sandbox's Ray head and Serve."""
    marker = str(cfg.ray_temp)
    pid = tracked_pid(cfg.pid_file("ray"), marker)
    if pid is not None and _dashboard_answers(cfg, token):
        _log(f"ray head already running (pid {pid}, {cfg.dashboard_url})")
    else:
        stop_session(cfg.pid_file("ray"), marker, "unhealthy or half-started ray head")
        busy = [p for p in (cfg.gcs_port, cfg.dashboard_port, cfg.serve_port) if port_in_use(p)]
        if busy:
            raise SandboxError(
                f"ports {busy} on {LOOPBACK} are taken (another Ray?); free them or set "
                "LLMRAY_SANDBOX_{GCS,DASHBOARD,SERVE}_PORT"
            )
        # Ports nobody dials from outside: take a free one when another head holds the default
        # (two heads on one agent port leave one without a job agent: "No available agent").
        client_port = cfg.client_port if not port_in_use(cfg.client_port) else _free_port()
        agent_port = cfg.agent_port if not port_in_use(cfg.agent_port) else _free_port()
        _log(f"ray head: starting on {cfg.dashboard_url} (log {cfg.log_file('ray')})")
        cfg.ray_temp.mkdir(parents=True, exist_ok=True)
        env = ray_env(token, os.environ)
        proc = start_detached(
            ray_start_command(cfg, client_port, agent_port),
            env,
            cfg.log_file("ray"),
            cfg.pid_file("ray"),
            cfg.repo,
        )

        def up() -> bool:
            if proc.poll() is not None:
                raise SandboxError(
                    f"ray start exited; log {cfg.log_file('ray')}:\n{_tail(cfg.log_file('ray'))}"
                )
            return _dashboard_answers(cfg, token)

        _wait(up, RAY_START_TIMEOUT_S, "the Ray dashboard")
    try:
        if asyncio.run(_start_serve(cfg, token)):
            _log(f"serve: HTTP proxy on {cfg.serve_url}")
    except RayError as exc:
        raise SandboxError(f"could not start Ray Serve: {exc}") from exc
    _wait(lambda: port_in_use(cfg.serve_port), 120, f"Serve HTTP on {cfg.serve_url}")


def apply_crds(cfg: SandboxConfig, kubeconfig: Path, bins: Path | None) -> None:
    kubectl = str(bins / "kubectl") if bins and (bins / "kubectl").exists() else shutil.which("kubectl")
    if not kubectl:
        raise SandboxError("kubectl not found (tests/cluster/build.sh builds it)")
    crds = sorted((cfg.repo / "crds").glob("*.yaml"))
    if not crds:
        raise SandboxError(f"no CRDs in {cfg.repo / 'crds'} (run `llmray crds`)")
    _log(f"CRDs: applying {', '.join(p.name for p in crds)}")
    base = [kubectl, "--kubeconfig", str(kubeconfig)]
    files = [arg for p in crds for arg in ("-f", str(p))]
    _run([*base, "apply", "--server-side", "--force-conflicts", *files], cfg.repo, timeout=120)
    _run([*base, "wait", "--for=condition=Established", "--timeout=60s", *files], cfg.repo, timeout=90)


def operator_available() -> bool:
    """Whether this checkout's CLI has the ``operator`` command yet."""
    proc = subprocess.run(
        [sys.executable, "-m", OPERATOR_MARKER, "operator", "--help"],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode == 0


def operator_up(cfg: SandboxConfig, kubeconfig: Path) -> bool:
    """Start (or reuse) the operator; False (with a message) when the CLI has no operator yet."""
    pid = tracked_pid(cfg.pid_file("operator"), OPERATOR_MARKER)
    if pid is not None:
        _log(f"operator already running (pid {pid}, log {cfg.log_file('operator')})")
        return True
    if not operator_available():
        _log("operator: `python -m llmray.cli operator` is not available in this checkout yet; "
             "control plane and Ray are up, start the operator yourself once it exists")  # fmt: skip
        return False
    _log(f"operator: starting (log {cfg.log_file('operator')})")
    env = operator_env(kubeconfig, os.environ)
    proc = start_detached(
        operator_command(cfg, kubeconfig), env, cfg.log_file("operator"), cfg.pid_file("operator"), cfg.repo
    )
    time.sleep(3)  # a crash at import or on a bad kubeconfig shows within this grace period
    if proc.poll() is not None:
        raise SandboxError(f"the operator exited at start; log {cfg.log_file('operator')}:\n"
                           f"{_tail(cfg.log_file('operator'))}")  # fmt: skip
    return True


def up(cfg: SandboxConfig, *, with_operator: bool = True) -> int:
    """Bring the whole sandbox up (idempotent)."""
    token = ensure_token(cfg)
    kubeconfig, bins = cluster_up(cfg)
    ray_up(cfg, token)
    apply_crds(cfg, kubeconfig, bins)
    (cfg.state / "env").write_text(env_script(cfg, kubeconfig, bins))
    running = operator_up(cfg, kubeconfig) if with_operator else False
    print(f"""
llmray sandbox is up
  Kubernetes   KUBECONFIG={kubeconfig}
  Ray          dashboard {cfg.dashboard_url}   serve {cfg.serve_url}   (token: {cfg.token_file})
  operator     {"running, log " + str(cfg.log_file("operator")) if running else "NOT running"}
  explore      source {cfg.state / "env"}; kubectl get llmray,pods; ray job list
  tear down    python -m llmray.sandbox down
""")
    return 0


def down(cfg: SandboxConfig) -> int:
    """Stop the operator, the Ray head and the control plane; remove the sandbox's files."""
    stop_session(cfg.pid_file("operator"), OPERATOR_MARKER, "operator")
    # Short grace: the head's state is disposable, and its GCS takes ~30 s to honour SIGTERM.
    stop_session(cfg.pid_file("ray"), str(cfg.ray_temp), "ray head", grace_s=5)
    script = cfg.repo / "tests" / "cluster" / "cluster.sh"
    if script.is_file():
        try:
            _run(["bash", str(script), "down"], cfg.repo, timeout=300, env=cluster_env(cfg))
        except (SandboxError, subprocess.TimeoutExpired) as exc:
            _log(f"control plane: {exc}")
    shutil.rmtree(cfg.state, ignore_errors=True)
    shutil.rmtree(cfg.ray_temp, ignore_errors=True)
    _log("down")
    return 0


async def _serve_apps(cfg: SandboxConfig, token: str) -> str:
    async with RayClient(cfg.dashboard_url, token) as ray:
        inst = await ray.serve.get_applications()
        jobs = await ray.jobs.list()
    apps = ", ".join(f"{a.name}={a.status}" for a in inst.applications.values()) or "none"
    active = sum(1 for j in jobs if not j.terminal)
    serve = "running" if inst.running else "stopped"
    return f"serve {serve} (apps: {apps}); jobs: {len(jobs)} ({active} active)"


def status(cfg: SandboxConfig) -> int:
    """Print what runs; exit 0 when every part does, 3 otherwise."""
    ok = True
    script = cfg.repo / "tests" / "cluster" / "cluster.sh"
    cluster = subprocess.run(
        ["bash", str(script), "status"],
        cwd=cfg.repo,
        capture_output=True,
        text=True,
        check=False,
        env=cluster_env(cfg),
    )
    print(f"control plane  {'running' if cluster.returncode == 0 else 'not running'}")
    ok &= cluster.returncode == 0

    ray_pid = tracked_pid(cfg.pid_file("ray"), str(cfg.ray_temp))
    token = cfg.token_file.read_text().strip() if cfg.token_file.is_file() else ""
    if ray_pid and token and _dashboard_answers(cfg, token):
        try:
            detail = asyncio.run(_serve_apps(cfg, token))
        except RayError as exc:
            detail = f"({exc})"
        print(f"ray head       running (pid {ray_pid}) {cfg.dashboard_url}; {detail}")
    else:
        print(f"ray head       {'unhealthy (pid ' + str(ray_pid) + ')' if ray_pid else 'not running'}")
        ok = False

    op_pid = tracked_pid(cfg.pid_file("operator"), OPERATOR_MARKER)
    print(f"operator       {'running (pid ' + str(op_pid) + ')' if op_pid else 'not running'}"
          + (f", log {cfg.log_file('operator')}" if op_pid else ""))  # fmt: skip
    ok &= op_pid is not None
    if (cfg.state / "env").is_file():
        print(f"explore        source {cfg.state / 'env'}")
    return 0 if ok else 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``llmray sandbox`` (the CLI adds them to its ``sandbox`` subparser)."""
    parser.add_argument("action", choices=["up", "down", "status"], help="what to do")
    parser.add_argument("--no-operator", action="store_true", help="up: everything but the operator")


def run(args: argparse.Namespace) -> int:
    """Run ``llmray sandbox <action>``; returns the exit code."""
    try:
        cfg = SandboxConfig.from_env(find_repo())
        if args.action == "up":
            return up(cfg, with_operator=not args.no_operator)
        if args.action == "down":
            return down(cfg)
        return status(cfg)
    except (SandboxError, subprocess.TimeoutExpired) as exc:
        print(f"[sandbox] ERROR: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llmray.sandbox up|down|status``."""
    parser = argparse.ArgumentParser(prog="llmray sandbox", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
