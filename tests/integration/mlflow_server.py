"""A real ``mlflow server`` for the integration tier: loopback, SQLite backend, artifacts served by the server,
basic auth on; started and stopped on demand over one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
USER, PASSWORD = "admin", "paddock-test-password"


class Server:
    """``mlflow server`` on loopback with basic auth, started and stopped on demand over one store."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"
        ini = root / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")} | {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "paddock-test-secret",
        }

    def start(self) -> None:
        import requests

        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            env=self.env,
            stdout=open(self.root / "server.log", "a"),  # noqa: SIM115 (the server's for its life)
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError("mlflow server did not start: " + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
