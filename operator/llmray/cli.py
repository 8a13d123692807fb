"""The ``llmray`` command: run the operator, generate CRDs, manage the local sandbox."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmray.controllers.settings import Settings
from llmray.controllers.topology import topology_of

DEFAULT_CRD_DIRS = ("crds", "charts/llmray/crds")

# Environment fallbacks of the topology flags (read here, at start-up, and nowhere else).
DASHBOARD_URL_ENV = "LLMRAY_RAY_DASHBOARD_URL"
SERVE_URL_ENV = "LLMRAY_RAY_SERVE_URL"
SHARED_TOKEN_ENV = "LLMRAY_SANDBOX_RAY_TOKEN"
AUTH_KEY_FILE_ENV = "LLMRAY_AUTH_KEY_FILE"
POD_NAMESPACE_ENV = "POD_NAMESPACE"


def _crds(args: argparse.Namespace) -> int:
    from llmray.api.crd import render_crds

    stale = []
    for folder in args.out or DEFAULT_CRD_DIRS:
        out = Path(folder)
        for name, text in render_crds().items():
            path = out / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path}")
    if stale:
        print("stale CRDs (run `llmray crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """The operator's :class:`~llmray.controllers.settings.Settings`, built once from the flags.

    The topology flags fall back to their environment variables (compatibility with deployments
    that set them); a bad value raises ValueError naming it.
    """
    token = env.get(SHARED_TOKEN_ENV) or None
    if args.ray_token_file:
        token = Path(args.ray_token_file).read_text().strip() or None
    topology = topology_of(
        args.ray_dashboard_url or env.get(DASHBOARD_URL_ENV) or None,
        args.ray_serve_url or env.get(SERVE_URL_ENV) or None,
        token,
    )
    from llmray.builders.cluster import operator_peer

    extra: dict[str, Any] = {}
    auth_key_file = args.auth_key_file or env.get(AUTH_KEY_FILE_ENV)
    if auth_key_file:
        key = Path(auth_key_file).read_bytes().strip()
        if len(key) < 32:
            raise ValueError(f"--auth-key-file {auth_key_file}: need at least 32 bytes of key")
        extra["auth_key"] = key
    else:
        logging.getLogger("llmray").warning(
            "no --auth-key-file: Ray auth tokens derive from a per-process key and do not survive a "
            "restart (the Helm chart always mounts one)"
        )
    election = None
    if args.leader_elect:
        from llmray.leader import ElectionConfig, default_identity

        namespace = args.lease_namespace or args.operator_namespace or env.get(POD_NAMESPACE_ENV) or ""
        if not namespace:
            raise ValueError("--leader-elect needs --lease-namespace (or --operator-namespace)")
        election = ElectionConfig(
            name=args.lease_name,
            namespace=namespace,
            identity=default_identity(env),
            lease_duration=args.lease_duration,
            renew_deadline=args.renew_deadline,
            retry_period=args.retry_period,
        )
    return Settings(
        leader_election=election,
        unschedulable_timeout=args.unschedulable_timeout,
        resync_seconds=args.resync,
        workers=args.workers,
        pass_timeout=args.pass_timeout,
        stuck_after=args.stuck_after,
        topology=topology,
        operator_peer=operator_peer(args.operator_namespace, args.operator_pod_labels),
        metrics_peer=operator_peer(args.metrics_scraper_namespace, args.metrics_scraper_pod_labels),
        stalled_after=args.stalled_after,
        queue_full_ratio=args.queue_full_ratio,
        kueue_api=args.kueue_api,
        kueue_default_queue=args.kueue_default_queue,
        kueue_queue_required=args.kueue_require_queue,
        **extra,
    )


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from llmray.operator_main import RunConfig, run

    try:
        settings = settings_from_args(args, os.environ)
    except (OSError, ValueError) as exc:
        print(f"llmray operator: {exc}", file=sys.stderr)
        return 2

    kopf.configure(
        debug=args.log_level == "debug",
        quiet=args.log_level in ("warning", "error"),
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if args.log_level != "debug":
        # Kopf logs every handled watch event at INFO; the reconcilers log what they do.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = RunConfig(
        namespaces=tuple(args.namespace or ()),
        all_namespaces=args.all_namespaces,
        liveness=None if args.liveness in ("", "off") else args.liveness,
        peering=args.peering,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        kubeconfig=args.kubeconfig,
    )
    return run(config, settings)


def _sandbox(args: argparse.Namespace) -> int:
    from llmray import sandbox

    return sandbox.run(args)


def _demo(args: argparse.Namespace) -> int:
    from llmray.demo import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands register themselves here."""
    parser = argparse.ArgumentParser(prog="llmray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    crds = sub.add_parser("crds", help="generate crds/*.yaml from the API models")
    crds.add_argument(
        "--out",
        action="append",
        help="output folder, repeatable (default: crds and the Helm chart's charts/llmray/crds)",
    )
    crds.add_argument("--check", action="store_true", help="fail if the committed CRDs are stale")
    crds.set_defaults(func=_crds)

    op = sub.add_parser(
        "operator",
        help="run the operator (Kopf) against the current kubeconfig or in-cluster",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scope = op.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", help="namespace to watch (repeatable; default: all namespaces)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument("--peering", metavar="NAME", help="enable Kopf peering (needs Kopf's peering CRDs)")
    op.add_argument(
        "--liveness",
        default="http://127.0.0.1:8080/healthz",
        help="health endpoint URL for probes ('' or 'off' disables; in a pod use http://0.0.0.0:8080/healthz)",
    )
    op.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    op.add_argument("--metrics-address", default="127.0.0.1", help="metrics bind address")
    op.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    op.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    op.add_argument("--log-format", choices=["plain", "json"], default="plain")
    op.add_argument(
        "--resync", type=float, default=Settings.resync_seconds, help="seconds between full resyncs"
    )
    op.add_argument("--workers", type=int, default=Settings.workers, help="resources reconciled concurrently")
    op.add_argument(
        "--unschedulable-timeout",
        type=float,
        default=Settings.unschedulable_timeout,
        help="seconds a Ray pod may stay Unschedulable before its resource is marked Failed",
    )
    op.add_argument(
        "--pass-timeout",
        type=float,
        default=Settings.pass_timeout,
        help="seconds one reconcile pass may take before it is abandoned and retried",
    )
    op.add_argument(
        "--stuck-after",
        type=float,
        default=Settings.stuck_after,
        help="liveness fails when a reconcile pass has been running this long",
    )
    op.add_argument(
        "--stalled-after",
        type=float,
        default=Settings.stalled_after,
        help="seconds without a new progress report before a Running training job is marked Stalled",
    )
    op.add_argument(
        "--kueue-api",
        default=Settings.kueue_api,
        help="Kueue API group/version for the Workloads of jobs labelled kueue.x-k8s.io/queue-name "
        "(detected at start-up; while it is not served such jobs are held)",
    )
    op.add_argument(
        "--kueue-default-queue",
        action="store_true",
        help="a training job without the kueue.x-k8s.io/queue-name label uses the LocalQueue named "
        "'default' of its namespace when there is one (Kueue's LocalQueueDefaulting)",
    )
    op.add_argument(
        "--kueue-require-queue",
        action="store_true",
        help="hold training jobs that have no Kueue queue (no label, no 'default' LocalQueue) instead "
        "of running them outside Kueue (Kueue's manageJobsWithoutQueueName)",
    )
    op.add_argument(
        "--queue-full-ratio",
        type=float,
        default=Settings.queue_full_ratio,
        help="a deployment is QueueFull when waiting requests reach this share of limits.maxQueuedRequests",
    )
    op.add_argument(
        "--metrics-scraper-namespace",
        default="",
        help="namespace whose pods may scrape the Ray pods' metrics port (NetworkPolicies; '': none)",
    )
    op.add_argument(
        "--metrics-scraper-pod-labels",
        default="",
        help="k=v,... labels selecting the scraper pods in --metrics-scraper-namespace ('': all its pods)",
    )
    op.add_argument(
        "--auth-key-file",
        help="file holding the key each Ray cluster's auth token is derived from (>= 32 bytes; "
        f"env fallback: {AUTH_KEY_FILE_ENV})",
    )
    op.add_argument(
        "--operator-namespace",
        default="",
        help="namespace of the operator's pods, for the Ray clusters' NetworkPolicies ('' : outside)",
    )
    op.add_argument(
        "--operator-pod-labels",
        default="",
        help="k=v,... labels selecting the operator's pods in --operator-namespace (NetworkPolicies)",
    )
    elect = op.add_argument_group(
        "Leader election",
        "with several replicas, only the holder of a coordination.k8s.io Lease reconciles (docs/operator.md)",
    )
    elect.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="reconcile only while holding the Lease (the Helm chart turns it on)",
    )
    elect.add_argument("--lease-name", default="llmray-operator", help="name of the Lease")
    elect.add_argument(
        "--lease-namespace",
        default="",
        help=f"namespace of the Lease (default: --operator-namespace, else ${POD_NAMESPACE_ENV})",
    )
    elect.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits, after the Lease last changed, before taking it over",
    )
    elect.add_argument(
        "--renew-deadline",
        type=float,
        default=10.0,
        help="seconds the leader keeps reconciling without a successful renewal",
    )
    elect.add_argument("--retry-period", type=float, default=2.0, help="seconds between Lease reads/renewals")
    ray = op.add_argument_group(
        "Ray topology",
        "default: each resource has its own head at <name>-head.<ns>.svc (token from its Secret). "
        "A dashboard URL without {name}/{namespace} selects one shared head for every resource.",
    )
    ray.add_argument(
        "--ray-dashboard-url",
        metavar="URL",
        help=f"Ray dashboard URL or template with {{name}}/{{namespace}} (env fallback: {DASHBOARD_URL_ENV})",
    )
    ray.add_argument(
        "--ray-serve-url",
        metavar="URL",
        help=f"Ray Serve HTTP URL or template (env fallback: {SERVE_URL_ENV})",
    )
    ray.add_argument(
        "--ray-token-file",
        metavar="PATH",
        help=f"file holding the shared head's token, written into every auth Secret (env fallback: "
        f"{SHARED_TOKEN_ENV}, the token itself)",
    )
    op.set_defaults(func=_operator)

    # Development tooling: present in a checkout, left out of the operator image.
    if importlib.util.find_spec("llmray.sandbox") is not None:
        from llmray import sandbox

        box = sub.add_parser(
            "sandbox", help="a local control plane + Ray head + operator on 127.0.0.1 (docs/sandbox.md)"
        )
        sandbox.add_arguments(box)
        box.set_defaults(func=_sandbox)

    if importlib.util.find_spec("llmray.demo") is not None:
        demo = sub.add_parser("demo", help="train the tiny model, serve it and chat with it, in the sandbox")
        demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stage")
        demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
