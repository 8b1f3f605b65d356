"""Cluster YAMLs against the ray-schema.json shipped in the installed ray, KubeRay manifests, the runtime env."""

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = sorted((REPO / "clusters").glob("*.yaml"))


def ray_version() -> str:
    import ray

    return ray.__version__


def paddock_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_images_install_paddock_as_make_does_on_rays_own_images():
    """docker/Dockerfile builds on Ray's image of the pinned version and installs through docker/install.sh, the
    script make's .venv comes from; make image names the variants after pyproject's version. (Built where a
    Docker daemon and Docker Hub are reachable: neither is, on the CI machine.)"""
    import subprocess

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE=rayproject/ray:{ray_version()}-py311-cpu" in dockerfile
    assert "sh docker/install.sh python" in dockerfile
    assert (
        "TORCH='$(TORCH)' sh docker/install.sh $(BIN)/python -e '.[dev]'" in (REPO / "Makefile").read_text()
    )
    builds = {}
    for variant in ("cpu", "cuda"):
        out = subprocess.run(  # under make test, make would also print the directories it enters
            ["make", "--no-print-directory", "-n", "image", f"VARIANT={variant}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        [build] = [line for line in out.splitlines() if line.startswith("docker build ")]
        builds[variant] = build.split()
    cu = "cu128"
    assert f"BASE=rayproject/ray:{ray_version()}-py311-{cu}" in builds["cuda"]
    assert f"TORCH_INDEX=https://download.pytorch.org/whl/{cu}" in builds["cuda"]
    assert builds["cuda"][-2:] == [f"paddock:{paddock_version()}-cuda", "."]
    assert builds["cpu"][-2:] == [f"paddock:{paddock_version()}-cpu", "."]
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".paddock", ".git"} <= set(dockerignore)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_validates_against_rays_schema(path: Path):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    text = path.read_text()
    assert text.startswith("#") and "What it launches" in text, "each cluster YAML documents what it launches"
    assert "torch==2.13.0" in text and "dashboard-host=0.0.0.0" not in text
    # Locked by default: Ray's token authentication on every node, the token copied from the user's machine, and
    # no server bound to every interface
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert [c for c in starts if "ray start" in c] and all(
        "RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c
    )
    assert "RAY_AUTH_MODE=disabled" not in text and "0.0.0.0" not in text
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # An MLflow server on a cluster asks for a password (MLflow's basic-auth app); every Ray process starts with
    # the credentials, from a file copied from the user's machine like the token
    servers = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    if servers:
        assert all("--app-name basic-auth" in c and ". ~/.paddock/mlflow.env" in c for c in servers)
        assert config["file_mounts"]["~/.paddock/mlflow.env"] == "~/.paddock/mlflow.env"
        assert all(". ~/.paddock/mlflow.env" in c for c in starts if "ray start" in c)
        assert "mlflow[auth]==" in text


def test_cluster_yamls_exist():
    assert {p.name for p in CLUSTERS} == {"local.yaml", "aws-a100.yaml", "aws-h100.yaml", "gcp-a100.yaml"}


def _templates(spec: dict) -> list[dict]:
    return [g["template"] for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]


def _containers(spec: dict) -> list[dict]:
    return [c for t in _templates(spec) for c in t["spec"]["containers"]]


@pytest.mark.parametrize(
    ("name", "kind", "cluster_key"),
    [
        ("raycluster.yaml", "RayCluster", None),
        ("rayjob.yaml", "RayJob", "rayClusterSpec"),
        ("rayservice.yaml", "RayService", "rayClusterConfig"),
    ],
)
def test_kuberay_manifests_have_their_crds_required_fields(name: str, kind: str, cluster_key: str | None):
    doc = yaml.safe_load((REPO / "clusters" / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"] if cluster_key is None else doc["spec"][cluster_key]
    assert spec["rayVersion"] == ray_version()
    assert (
        "rayStartParams" in spec["headGroupSpec"] and spec["headGroupSpec"]["template"]["spec"]["containers"]
    )
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay's token auth: its Secret, on every container
    text = (REPO / "clusters" / "kuberay" / name).read_text()
    assert "RAY_AUTH_MODE, value: disabled" not in text and "RAY_AUTH_MODE: disabled" not in text
    for group in spec.get("workerGroupSpecs", []):
        assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"]
        assert "rayStartParams" in group
    for template in _templates(spec):  # non-root pods that networkpolicy.yaml selects
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "paddock"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in _containers(spec):
        image = container["image"]  # paddock's image of the variant the pod's hardware needs
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert image == f"ghcr.io/your-org/paddock:{paddock_version()}-{'cuda' if gpus else 'cpu'}", image
        assert container["resources"]["limits"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        assert {"secretRef": {"name": "paddock-mlflow"}} in container["envFrom"]
    if kind == "RayJob":  # runs what the image holds, installing nothing at job start
        assert doc["spec"]["entrypoint"].startswith("cd /home/ray/paddock && python jobs/")
        assert "pip" not in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    if kind == "RayService":
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        app = serve["applications"][0]
        assert app["import_path"] == "paddock.serving.app:app_builder" and app["args"]["model"]["uri"]


def test_runtime_env_ships_paddock_and_excludes_local_state():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and env["py_modules"] == ["platform/paddock"]
    assert {".paddock/", ".venv/"} <= set(env["excludes"])
    assert (REPO / env["py_modules"][0] / "__init__.py").is_file()


def test_the_network_policy_admits_only_paddock_pods_the_operator_and_serve_clients():
    doc = yaml.safe_load((REPO / "clusters" / "kuberay" / "networkpolicy.yaml").read_text())
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    assert doc["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "paddock"}}
    rules = doc["spec"]["ingress"]
    # every rule names its sources; only the rule among paddock's own pods leaves the ports open
    assert all(rule["from"] for rule in rules)
    open_rules = [r for r in rules if "ports" not in r]
    assert open_rules == [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "paddock"}}}]}
    ]
    ports = {
        next(iter(r["from"][0]["podSelector"]["matchLabels"].values())): {p["port"] for p in r["ports"]}
        for r in rules
        if "ports" in r
    }
    assert ports == {"kuberay-operator": {8265, 52365}, "true": {8000}}
