"""The deployment's side of issue 28: the load balancer cuts off slow clients no later than the guard
would, and /metrics is kept from clients (a network policy in Compose, keys otherwise)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
NGINX = REPO / "docker" / "nginx" / "nginx.conf"


def nginx_seconds(directive: str) -> float:
    match = re.search(rf"^\s*{directive}\s+(\d+)s?;", NGINX.read_text(), re.M)
    assert match, f"{NGINX.name} sets no {directive}"
    return float(match.group(1))


def test_nginx_times_out_slow_headers_and_bodies_no_later_than_the_guard():
    defaults = ServiceSettings.model_fields
    assert nginx_seconds("client_header_timeout") <= defaults["header_timeout_s"].default
    assert nginx_seconds("client_body_timeout") <= defaults["body_timeout_s"].default


def test_compose_opens_metrics_only_behind_its_network_policy():
    """The server closes /metrics by default once keys are set; Compose turns that off only because
    no client can reach it: the guards publish no port and the load balancer answers 404 for it."""
    assert ServiceSettings.model_fields["protect_metrics"].default is True
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    guard = compose["services"]["guard"]
    assert guard["environment"]["BADEXPERT_PROTECT_METRICS"] == "${BADEXPERT_PROTECT_METRICS:-false}"
    assert "ports" not in guard
    assert re.search(r"location = /metrics \{\s*return 404;", NGINX.read_text())
