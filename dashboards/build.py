"""Writes paddock's Grafana dashboards (training, PPO, serving) from the panel lists below.

    python dashboards/build.py        # rewrites dashboards/*.json

Every expression uses metrics that paddock exports through Ray (``paddock.metrics``: the ``ray_paddock_*``
names) or that Ray exports itself; ``tests/unit/test_dashboards.py`` checks both, and that the JSON files match
this script. The datasource is a variable, so the dashboards import into any Grafana with a Prometheus source.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (title, unit, [(expression, legend)])
TRAINING = [
    ("Training loss", "none", [("ray_paddock_train_loss", "{{stage}} {{run}}")]),
    ("Tokens per second", "short", [("ray_paddock_train_tokens_per_s", "{{stage}} {{run}}")]),
    ("Model FLOPs utilisation", "percentunit", [("ray_paddock_train_mfu", "{{stage}} {{run}}")]),
    ("Gradient norm", "none", [("ray_paddock_train_grad_norm", "{{stage}} {{run}}")]),
    ("Optimiser steps", "short", [("ray_paddock_train_step", "{{stage}} {{run}}")]),
    (
        "GPU utilisation",
        "percent",
        [("sum(ray_node_gpus_utilization) by (instance)", "{{instance}}")],
    ),
    ("Node CPU utilisation", "percent", [("avg(ray_node_cpu_utilization) by (instance)", "{{instance}}")]),
    ("Object store memory", "bytes", [("sum(ray_object_store_memory) by (Location)", "{{Location}}")]),
    ("Checkpoint sync time", "s", [("ray_train_checkpoint_sync_total_time_s", "{{ray_train_run_name}}")]),
]
PPO = [
    (
        "Reward (sigmoid scale)",
        "none",
        [
            ("ray_paddock_ppo_reward_combined", "combined {{run}}"),
            ("ray_paddock_ppo_reward_helpfulness", "helpfulness {{run}}"),
            ("ray_paddock_ppo_reward_safety", "safety {{run}}"),
        ],
    ),
    ("KL to the reference (nats per answer)", "none", [("ray_paddock_ppo_kl", "{{run}}")]),
    (
        "Time per iteration",
        "s",
        [
            ("ray_paddock_ppo_generate_s", "generate {{run}}"),
            ("ray_paddock_ppo_score_s", "score {{run}}"),
            ("ray_paddock_ppo_train_s", "train {{run}}"),
            ("ray_paddock_ppo_weight_sync_s", "weight sync {{run}}"),
        ],
    ),
    ("Rollout buffer occupancy", "percentunit", [("ray_paddock_ppo_buffer_occupancy", "{{run}}")]),
    ("Experience staleness (policy versions)", "none", [("ray_paddock_ppo_buffer_staleness", "{{run}}")]),
    ("Live actors", "short", [("sum(ray_actors) by (State)", "{{State}}")]),
]
SERVING = [
    (
        "Requests per second by route and code",
        "reqps",
        [("sum(rate(ray_paddock_serve_requests_total[1m])) by (route, code)", "{{route}} {{code}}")],
    ),
    (
        "Errors per second by code",
        "reqps",
        [("sum(rate(ray_paddock_serve_errors_total[1m])) by (code)", "{{code}}")],
    ),
    (
        "Latency p50 / p95 / p99",
        "s",
        [
            (
                f"histogram_quantile({q}, sum(rate(ray_paddock_serve_latency_s_bucket[5m])) by (le, route))",
                f"p{int(q * 100)} {{{{route}}}}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
    ),
    (
        "Time to first token p50 / p95",
        "s",
        [
            (
                f"histogram_quantile({q}, sum(rate(ray_paddock_serve_time_to_first_token_s_bucket[5m])) by (le))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95)
        ],
    ),
    (
        "Tokens generated per second",
        "short",
        [("sum(rate(ray_paddock_serve_tokens_generated_total[1m]))", "tokens/s")],
    ),
    (
        "Serve HTTP requests (Ray)",
        "reqps",
        [("sum(rate(ray_serve_num_http_requests_total[1m])) by (route)", "{{route}}")],
    ),
    (
        "Healthy replicas",
        "short",
        [("sum(ray_serve_deployment_replica_healthy) by (deployment)", "{{deployment}}")],
    ),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str, title: str, panels: list) -> dict:
    return {
        "uid": uid,
        "title": title,
        "tags": ["paddock", "ray"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                }
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


DASHBOARDS = {
    "training.json": dashboard("paddock-training", "paddock: training", TRAINING),
    "ppo.json": dashboard("paddock-ppo", "paddock: PPO", PPO),
    "serving.json": dashboard("paddock-serving", "paddock: serving", SERVING),
}


def render(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"


if __name__ == "__main__":
    for name, d in DASHBOARDS.items():
        (HERE / name).write_text(render(d))
        print(f"wrote dashboards/{name} ({len(d['panels'])} panels)")
