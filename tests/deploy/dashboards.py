"""The dashboards' queries, read from deploy/grafana/dashboards (shared by the deploy tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.deploy.tools import ROOT

DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
# Grafana's variables, as the live test evaluates them: every model, a one-minute rate window.
VARIABLES = {"$model_name": ".*", "$__rate_interval": "1m"}


@dataclass(frozen=True)
class Query:
    """One panel target."""

    dashboard: str
    panel: str
    expr: str

    def promql(self) -> str:
        """The expression with Grafana's variables replaced."""
        text = self.expr
        for name, value in VARIABLES.items():
            text = text.replace(name, value)
        return text

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel}: {self.expr}"


def dashboards() -> dict[str, dict]:
    """The dashboard JSON files by name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def queries() -> list[Query]:
    """Every panel target of every dashboard."""
    return [Query(name, panel["title"], target["expr"])
            for name, board in dashboards().items()
            for panel in board["panels"] for target in panel["targets"]]  # fmt: skip
