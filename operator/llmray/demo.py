"""``make demo`` / ``python -m llmray.demo``: train the tiny model, serve it and chat with it.

Everything runs in the local sandbox (``llmray sandbox up``): a real control plane, the real operator
and a real Ray head on 127.0.0.1. Steps:

1. sandbox up (idempotent);
2. build the tiny model into ``/tmp/llmray/models/tiny`` and copy the bundled facts (made-up Q/A
   pairs) to ``/tmp/llmray/data/`` (the paths ``examples/training-tiny-cpu.yaml`` uses);
3. apply ``examples/training-tiny-cpu.yaml`` and show its live progress from the resource's status;
4. apply ``examples/deployment-from-training.yaml`` (serves that job's output) and wait for Ready;
5. ask the served model one of the facts with the ``openai`` client at ``status.endpoint`` (greedy)
   and compare its answer with the one it was trained on.

A second run finds everything in place and only asks the question again.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llmray import sandbox

MODEL_DIR = Path("/tmp/llmray/models/tiny")
DATA_FILE = Path("/tmp/llmray/data/facts.jsonl")
TRAINING = "examples/training-tiny-cpu.yaml"
DEPLOYMENT = "examples/deployment-from-training.yaml"
NAMESPACE = "default"
console = Console()


class DemoError(RuntimeError):
    """A stage did not finish; the message says where to look."""


def _kubectl(cfg: sandbox.SandboxConfig, kubeconfig: Path, *args: str) -> str:
    bins = sandbox.bin_dir(cfg)
    kubectl = str(bins / "kubectl") if bins and (bins / "kubectl").exists() else shutil.which("kubectl")
    if not kubectl:
        raise DemoError("kubectl not found (tests/cluster/build.sh builds it)")
    proc = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), *args],
        cwd=cfg.repo, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _status(api: Any, plural: str, name: str) -> dict[str, Any]:
    obj = api.get_namespaced_custom_object("llmray.io", "v1alpha1", NAMESPACE, plural, name)
    return dict(obj.get("status") or {})


def _wait(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; operator log: {log}")
        time.sleep(1)


def prepare_files(repo: Path) -> None:
    """The tiny model and the facts data at the paths the examples use."""
    from llmray_workloads.tiny import FACTS_FILE, build_tiny_model

    build_tiny_model(MODEL_DIR)
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "workloads" / "llmray_workloads" / "data" / FACTS_FILE, DATA_FILE)


def train(api: Any, timeout: float, log: Path) -> dict[str, Any]:
    """Show the job's live progress (from its status, as `kubectl get ltj` shows it) until it ends."""
    columns = (
        TextColumn("[bold]tiny-train[/] {task.fields[phase]:<12}"),
        BarColumn(),
        TextColumn("step {task.fields[steps]:<7}"),
        TextColumn("loss {task.fields[loss]:<7} {task.fields[tps]:>6} tok/s  ETA {task.fields[eta]:<6}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, phase="Pending", steps="-", loss="-", tps="-", eta="-")
        while True:
            st = _status(api, "llmtrainingjobs", "tiny-train")
            prog = st.get("progress") or {}
            bar.update(
                task,
                total=prog.get("totalSteps") or None,
                completed=prog.get("step", 0),
                steps=f"{prog.get('step', 0)}/{prog.get('totalSteps') or '?'}",
                phase=st.get("phase", "Pending"),
                loss=prog.get("loss") or "-",
                tps=str(prog.get("tokensPerSecond") or "-"),
                eta=prog.get("eta") or "-",
            )
            if st.get("phase") in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"training did not finish in {timeout:.0f}s; operator log: {log}")
            time.sleep(1)
    if st.get("phase") != "Succeeded":
        raise DemoError(f"training Failed: {st.get('message')} (kubectl describe ltj tiny-train)")
    return st


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    started = time.monotonic()
    cfg = sandbox.SandboxConfig.from_env(sandbox.find_repo())
    timeout = float(getattr(args, "timeout", 600.0))
    try:
        console.rule("[bold]1. sandbox up")
        if sandbox.up(cfg) != 0:
            raise DemoError("llmray sandbox up failed")
        token = sandbox.ensure_token(cfg)
        kubeconfig, _ = sandbox.cluster_up(cfg)
        if not sandbox._dashboard_answers(cfg, token):
            raise DemoError(f"the sandbox's Ray head does not answer at {cfg.dashboard_url}")
        log = cfg.log_file("operator")

        console.rule("[bold]2. tiny model and data")
        prepare_files(cfg.repo)
        console.print(f"model {MODEL_DIR}, data {DATA_FILE}")

        from kubernetes import client, config

        api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))

        console.rule("[bold]3. fine-tune (LLMTrainingJob tiny-train)")
        t0 = time.monotonic()
        _kubectl(cfg, kubeconfig, "apply", "-n", NAMESPACE, "-f", TRAINING)
        st = train(api, timeout, log)
        console.print(f"output {st['output']['uri']}  ({time.monotonic() - t0:.0f}s)")

        console.rule("[bold]4. serve (LLMDeployment tiny-tuned, model from the training job)")
        t0 = time.monotonic()
        _kubectl(cfg, kubeconfig, "apply", "-n", NAMESPACE, "-f", DEPLOYMENT)
        with console.status("waiting for LLMDeployment tiny-tuned to be Ready ..."):
            _wait(
                lambda: _status(api, "llmdeployments", "tiny-tuned").get("phase") == "Ready",
                timeout,
                "LLMDeployment tiny-tuned Ready",
                log,
            )
        endpoint = _status(api, "llmdeployments", "tiny-tuned")["endpoint"]
        console.print(f"Ready at {endpoint}  ({time.monotonic() - t0:.0f}s)")

        console.rule("[bold]5. chat (openai client)")
        from openai import OpenAI

        from llmray_workloads.tiny import facts

        question, expected = facts()[0]
        ai = OpenAI(base_url=endpoint, api_key="not-needed", max_retries=2, timeout=120)
        reply = ai.chat.completions.create(
            model="tiny-tuned",
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            temperature=0,
        )
        answer = (reply.choices[0].message.content or "").strip()
        console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] {answer}\n[bold]trained on:[/] {expected}")
        if answer == expected:
            console.print("[green]the answer matches the fact it was fine-tuned on[/]")
        else:
            console.print("[yellow]the answer does not match the fact it was fine-tuned on[/]")
    except (DemoError, sandbox.SandboxError, subprocess.TimeoutExpired) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f}s")
    console.print(
        f"""explore:
  source {cfg.state / "env"}
  kubectl get llmray                      # phase, progress, loss, endpoint
  kubectl describe ltj tiny-train         # conditions and events
  kubectl get pods -o wide                # the simulated Ray pods
  ray job list                            # the real Ray jobs on the local head
  curl {endpoint}/models
tear down:
  make sandbox-down"""
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmray.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stage")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
