"""The Ray topology: chosen once from the operator's settings, never read from the environment later."""

from __future__ import annotations

import pytest

from llmray.cli import build_parser, settings_from_args
from llmray.controllers.topology import PerResourceHeads, SharedHead, topology_of
from llmray.ray import HeadEndpoints, ServeRoute, serve_route

pytestmark = pytest.mark.unit


def test_default_is_one_head_per_resource_at_in_cluster_addresses() -> None:
    topo = topology_of(None, None, None)
    assert topo == PerResourceHeads()
    assert topo.token is None and not topo.shared
    assert topo.head("demo", "team-a") == HeadEndpoints(
        dashboard_url="http://demo-head.team-a.svc.cluster.local:8265",
        serve_url="http://demo-serve.team-a.svc.cluster.local:8000",
        overridden=False,
    )


def test_shared_head_serves_every_resource_with_one_token() -> None:
    topo = topology_of("http://127.0.0.1:8265/", "http://127.0.0.1:8000", "tok")
    assert topo == SharedHead("http://127.0.0.1:8265/", "http://127.0.0.1:8000", "tok")
    ends = topo.head("demo", "ns")
    assert ends == HeadEndpoints(
        "http://127.0.0.1:8265", "http://127.0.0.1:8000", overridden=True, shared=True
    )
    assert topo.head("other", "ns2").dashboard_url == ends.dashboard_url
    assert topo.token == "tok"


def test_templates_give_each_resource_its_own_address() -> None:
    topo = topology_of("https://{namespace}-{name}.ray.example.com", None, None)
    ends = topo.head("demo", "ns")
    assert ends.dashboard_url == "https://ns-demo.ray.example.com"
    assert ends.overridden and not ends.shared
    assert ends.serve_url == "http://demo-serve.ns.svc.cluster.local:8000"


@pytest.mark.parametrize(
    ("dashboard", "serve", "token", "match"),
    [
        ("http://{host}:8265", None, None, "unknown placeholder"),
        ("127.0.0.1:8265", "http://127.0.0.1:8000", None, "not an http"),
        ("ftp://x", "http://127.0.0.1:8000", None, "not an http"),
        ("http://127.0.0.1:8265", None, None, "needs its Serve URL"),
        (None, None, "tok", "needs a shared head"),
        ("http://{name}:8265", None, "tok", "without"),
    ],
)
def test_bad_settings_are_refused_at_start(
    dashboard: str | None, serve: str | None, token: str | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        topology_of(dashboard, serve, token)


def test_serve_route_own_head_and_shared_head() -> None:
    own = serve_route("chat", "team-a", PerResourceHeads().head("chat", "team-a"))
    assert own == ServeRoute("chat", "/", "http://chat-serve.team-a.svc.cluster.local:8000")
    shared_head = SharedHead("http://127.0.0.1:8265", "http://127.0.0.1:8000").head("chat", "team-a")
    shared = serve_route("chat", "team-a", shared_head)
    assert shared == ServeRoute("team-a-chat", "/team-a/chat", "http://127.0.0.1:8000/team-a/chat")


def test_cli_flags_win_over_environment_fallbacks(tmp_path: object) -> None:
    parser = build_parser()
    env = {
        "LLMRAY_RAY_DASHBOARD_URL": "http://127.0.0.1:1",
        "LLMRAY_RAY_SERVE_URL": "http://127.0.0.1:2",
        "LLMRAY_SANDBOX_RAY_TOKEN": "from-env",
    }
    from_env = settings_from_args(parser.parse_args(["operator"]), env)
    assert from_env.topology == SharedHead("http://127.0.0.1:1", "http://127.0.0.1:2", "from-env")
    flags = parser.parse_args(
        ["operator", "--ray-dashboard-url", "http://127.0.0.1:3", "--ray-serve-url", "http://127.0.0.1:4"]
    )
    assert settings_from_args(flags, env).topology == SharedHead(
        "http://127.0.0.1:3", "http://127.0.0.1:4", "from-env"
    )
    assert settings_from_args(parser.parse_args(["operator"]), {}).topology == PerResourceHeads()


def test_settings_defaults_are_written_once() -> None:
    from llmray.controllers.settings import Settings

    args = build_parser().parse_args(["operator"])
    settings = settings_from_args(args, {})
    assert settings == Settings()
