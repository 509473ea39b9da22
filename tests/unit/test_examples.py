"""Issue 7, item 6: the deployment examples agree with each other and with the options
(Kubernetes manifests parsed with PyYAML, the Dockerfile's files, the systemd unit)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from memcachefs.config import OPTIONS, load_config

yaml = pytest.importorskip("yaml")

EXAMPLES = Path(__file__).parents[2] / "examples"
ROOT = EXAMPLES.parent
ENV_OPTIONS = {entry.option.env: name for name, entry in OPTIONS.items()}


def _manifests() -> dict[str, dict[str, Any]]:
    with open(EXAMPLES / "kubernetes" / "memcachefs.yaml") as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def _container(name: str) -> dict[str, Any]:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def test_every_memcachefs_variable_is_an_option_and_the_config_validates(tmp_path: Path) -> None:
    env = {item["name"]: item["value"] for item in _container("memcachefs")["env"]}
    unknown = set(env) - set(ENV_OPTIONS)
    assert not unknown, unknown
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o400)
    env["MEMCACHEFS_CLUSTER_SECRET_FILE"] = str(secret)
    command = _container("memcachefs")["command"]
    config = load_config({"source": command[2], "mountpoint": command[3]}, environ=env)
    assert config.cache.capacity_bytes == 20 * 1024**3
    assert "--foreground" in command


def test_ports_paths_and_probes_agree() -> None:
    docs = _manifests()
    sidecar = _container("memcachefs")
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    listen_port = int(env["MEMCACHEFS_LISTEN"].rsplit(":", 1)[1])
    http_port = int(env["MEMCACHEFS_HTTP_ADDRESS"].rsplit(":", 1)[1])
    assert ports == {"peers": listen_port, "http": http_port}
    service = docs["Service"]
    assert service["spec"]["clusterIP"] == "None"
    (service_port,) = service["spec"]["ports"]
    name, dns_port = env["MEMCACHEFS_PEERS_DNS"].rsplit(":", 1)
    assert name.split(".")[0] == service["metadata"]["name"]
    assert service_port["port"] == int(dns_port) == listen_port
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": http_port}
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == http_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_mount_is_shared_and_the_secret_is_private() -> None:
    docs = _manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    sidecar, server = _container("memcachefs"), _container("server")
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    mountpoint = sidecar["command"][3]
    assert mounts["data-fast"]["mountPath"] == mountpoint
    assert mounts["data-fast"]["mountPropagation"] == "Bidirectional"
    assert mounts["data-slow"]["mountPath"] == sidecar["command"][2]
    assert sidecar["securityContext"]["privileged"] is True
    (shared,) = [m for m in server["volumeMounts"] if m["name"] == "data-fast"]
    assert shared["mountPath"] == mountpoint
    assert shared["mountPropagation"] == "HostToContainer"
    assert mountpoint in server["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_volume = volumes["cluster-secret"]["secret"]
    assert secret_volume["defaultMode"] == 0o400
    assert secret_volume["secretName"] == docs["Secret"]["metadata"]["name"]
    (item,) = secret_volume["items"]
    assert item["key"] in docs["Secret"]["stringData"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    secret_path = Path(mounts["cluster-secret"]["mountPath"]) / item["path"]
    assert env["MEMCACHEFS_CLUSTER_SECRET_FILE"] == str(secret_path)


def test_the_drain_fits_in_the_termination_grace_period() -> None:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    sidecar = _container("memcachefs")
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    command = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = float(env["MEMCACHEFS_SHUTDOWN_GRACE"])
    assert float(command[1]) + grace < pod["terminationGracePeriodSeconds"]


def test_the_dockerfile_copies_files_that_exist() -> None:
    text = (EXAMPLES / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+slim", text, re.MULTILINE)
    assert "fuse3" in text and "pip install" in text
    copied = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), source
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.MULTILINE)
    assert entrypoint is not None
    assert f"examples/entrypoint.sh {entrypoint[1]}" in text
    for match in re.findall(r"^ENV (MEMCACHEFS_\w+)=", text, re.MULTILINE):
        assert match in ENV_OPTIONS


def _unit() -> Path:
    return EXAMPLES / "systemd" / "memcachefs.service"


def test_the_systemd_unit_runs_in_the_foreground_with_real_options() -> None:
    text = _unit().read_text()
    assert "Type=simple" in text
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert exec_start.split()[1:3] == ["mount", "/data-slow"]
    assert "--foreground" in exec_start.split()
    for name in re.findall(r"^Environment=(MEMCACHEFS_\w+)=", text, re.MULTILINE):
        assert name in ENV_OPTIONS


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "memcachefs.service"
    # The binary it names need not be installed here: point it at one that is.
    unit.write_text(_unit().read_text().replace("/usr/local/bin/memcachefs", "/bin/true"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        if "memcachefs.service" in line and "Failed to" not in line
    ]
    assert result.returncode == 0 or not problems, result.stderr
