"""Deploying on Kubernetes: configuration by environment and secret files, /healthz, manifests.

The roles run as plain processes configured the way the manifests configure
their containers (no command-line flags at all); the manifests themselves are
rendered (``kubectl kustomize`` where it exists) and validated offline, in
strict mode, against a recent Kubernetes API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from didomagic.api import RemoteSession
from didomagic.client import Requirements
from didomagic.errors import NoMatchingRunner
from didomagic.protocol import Execute
from didomagic.serialize import unpack
from didomagic.urls import ConnectionURL
from runner import certs, environment

from .conftest import LOGS, TIMEOUT, MediatorProcess, RunnerProcess, _remember_token, wait_until

DEPLOY = Path(__file__).parent.parent / "deploy" / "kubernetes"

KUBERNETES_VERSION = "1.33"
"""A recent Kubernetes API the manifests must validate against."""


def _spawn(log_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """``didomagic-runner ARGS`` with only ``env`` as configuration (no user config leaks in)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIDOMAGIC_")}
    base["DIDOMAGIC_CONFIG"] = os.environ["DIDOMAGIC_CONFIG"]
    LOGS.append(log_path)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**base, **env},
        )


def _secret(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o400)
    return str(path)


def health(port: int, path: str = "/healthz") -> tuple[int, str]:
    """GET over HTTPS without a token or a pinned certificate, as a kubelet probe does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_roles_configured_only_by_environment_and_secret_files(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    certfile, keyfile, _ = certs.generate(tmp_path / "tls", ["localhost", "127.0.0.1"])
    mediator_env = {
        "DIDOMAGIC_PORT": "0",
        "DIDOMAGIC_STATE_DIR": str(tmp_path / "mediator-state"),
        "DIDOMAGIC_TOKEN_FILE": _secret(secrets, "token", "client-secret-token"),
        "DIDOMAGIC_RUNNER_TOKEN_FILE": _secret(secrets, "runner-token", "runner-secret-token"),
        "DIDOMAGIC_CERTFILE": str(certfile),
        "DIDOMAGIC_KEYFILE": str(keyfile),
    }
    process = _spawn(tmp_path / "mediator.log", mediator_env, "mediator")
    assert process.stdout is not None
    client_url, runner_url = (process.stdout.readline().decode().strip() for _ in range(2))
    mediator = MediatorProcess(
        process, client_url, runner_url, tmp_path / "mediator-state", tmp_path / "mediator.log"
    )
    try:
        assert ConnectionURL.parse(client_url).token == "client-secret-token", mediator.log
        _remember_token(client_url)
        _remember_token(runner_url)
        runner_env = {
            "DIDOMAGIC_PORT": "0",
            "DIDOMAGIC_NAME": "pod-1",
            "DIDOMAGIC_TAGS": "k8s",
            "DIDOMAGIC_STATE_DIR": str(tmp_path / "runner-state"),
            "DIDOMAGIC_MEDIATOR_URL_FILE": _secret(secrets, "runner-url", runner_url),
            "DIDOMAGIC_ARGS": "--heartbeat 0.5",
        }
        started = _spawn(tmp_path / "runner.log", runner_env)
        assert started.stdout is not None
        line = started.stdout.readline().decode().strip()
        runner = RunnerProcess(started, line, tmp_path / "runner-state", tmp_path / "runner.log")
        try:
            _remember_token(line)
            session = RemoteSession(ConnectionURL.parse(client_url), Requirements(tags=("k8s",)))
            code = "import os\nseen = sorted(k for k in os.environ if k.startswith('DIDOMAGIC'))"
            result, buffers = _retry_until_registered(session, Execute("e", code, fetch=("seen",)))
            assert result.status.value == "ok", result.error
            assert session.runner_name == "pod-1"
            seen = unpack([memoryview(b) for b in buffers[0]])
            assert "DIDOMAGIC_MEDIATOR_URL_FILE" not in seen  # the secret is not inherited
            session.close()

            runner_port = ConnectionURL.parse(line).port
            assert health(runner_port) == (200, "ok\n")  # no token, and nothing revealed
            assert health(mediator.port) == (200, "ok\n")
            assert health(mediator.port, "/")[0] == 401  # everything else still needs one
            assert health(runner_port, "/")[0] == 401
        finally:
            assert runner.stop() == 0, runner.log
    finally:
        assert mediator.stop() in (0, -signal.SIGKILL), mediator.log


def _retry_until_registered(session: RemoteSession, request: Execute) -> Any:
    """Run ``request`` once the runner has registered (until then the mediator has none)."""
    outcome: list[Any] = []

    def attempt() -> bool:
        try:
            outcome.append(session.execute(request, [], lambda output: None))
        except NoMatchingRunner:
            return False
        return True

    wait_until(attempt, "the environment-configured runner to serve a cell", TIMEOUT)
    return outcome[0]


# --------------------------------------------------------------------------- manifests


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as far as these manifests need: maps merge, named lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all("name" in p for p in patch):
        merged = [dict(item) for item in base]
        for item in patch:
            index = next((i for i, b in enumerate(merged) if b.get("name") == item["name"]), None)
            if index is None:
                merged.append(item)
            else:
                merged[index] = _merge(merged[index], item)
        return merged
    return patch


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The manifests of a kustomization, rendered by ``kubectl kustomize``."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the merge renderer covers the manifests)")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    )
    return _documents(out.stdout)


def render(directory: Path) -> list[dict[str, Any]]:
    """The manifests of a kustomization, by a simple merge of its resources and patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", ()):
        path = directory / resource
        documents += render(path) if path.is_dir() else _documents(path.read_text())
    for patch in kustomization.get("patches", ()):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        for i, doc in enumerate(documents):
            if (doc["kind"], doc["metadata"]["name"]) == (
                change["kind"],
                change["metadata"]["name"],
            ):
                documents[i] = _merge(doc, change)
    return documents


@pytest.mark.parametrize("renderer", [kustomize, render], ids=["kubectl", "merge"])
@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_every_manifest_validates_strictly(variant, renderer):
    documents = renderer(DEPLOY / variant)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == [
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    known = {environment.variable_of(f) for f in environment.flags("runner")}
    known |= {environment.variable_of(f) for f in environment.flags("mediator")}
    known |= {v + "_FILE" for v in known}
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"]
        unknown = {e["name"] for e in container["env"]} - known
        assert not unknown, f"variables didomagic does not read: {unknown}"
    runner = next(d for d in documents if d["metadata"]["name"] == "didomagic-runner")
    (container,) = runner["spec"]["template"]["spec"]["containers"]
    tags = next(e["value"] for e in container["env"] if e["name"] == "DIDOMAGIC_TAGS")
    if variant == "overlays/gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "gpu" in tags.split(",")
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_the_containerfile_builds_from_files_that_exist_and_runs_as_non_root():
    import shlex
    import tomllib

    root = DEPLOY.parent.parent
    lines = (root / "Containerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip() and line[0] != "#"]
    for word, rest in instructions:
        if word == "COPY":
            *sources, _ = rest.split()
            assert all((root / source).exists() for source in sources), rest
    (entry,) = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["didomagic-runner"] and "didomagic-runner" in scripts
    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user.strip() not in ("root", "0")
    known = {environment.variable_of(f) for f in environment.flags("runner")}
    for word, rest in instructions:
        if word == "ENV":
            names = {pair.split("=", 1)[0] for pair in shlex.split(rest)}
            assert names - {"PYTHONUNBUFFERED"} <= known, names
