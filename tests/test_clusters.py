"""clusters/: the launcher YAMLs against the schema shipped inside the installed ray
package, the KubeRay manifests against the published KubeRay CRD schemas, the secrets
only by reference, and the local multi-node script on a real (small) cluster.

The CRDs are read from ``<repo>/../shared/data/kuberay-crds/`` and deliberately not
copied into the project; where they are missing the tests that need them skip and say
where to put them (and fail under ``CI=true``, see ``conftest.shared_data_dir``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import shared_data_dir
from tripost_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = sorted((CLUSTERS / "kuberay").glob("ray*.yaml"))
LAUNCHER = sorted((CLUSTERS / "launcher").glob("*.yaml"))
SECRET_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN")
# Shapes of real provider keys: none may appear in any file under clusters/.
LITERAL_KEY = re.compile(r"(sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})")


# ------------------------------------------------------------------ schemas


@functools.lru_cache(maxsize=None)
def ray_cluster_schema() -> dict:
    """The cluster-launcher schema that ships inside the installed ray package."""
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"ray-schema.json not found inside the installed ray package ({path})"
    return json.loads(path.read_text())


def _openapi_to_jsonschema(node):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema, strictly.

    * ``nullable: true`` becomes a union with null;
    * ``x-kubernetes-int-or-string`` without a type becomes integer-or-string;
    * an object with ``properties`` and no ``additionalProperties`` is closed, as
      ``kubectl apply`` (strict field validation) rejects unknown fields, unless it is
      marked ``x-kubernetes-preserve-unknown-fields``;
    * the other x-kubernetes-* keys (list types, CEL validations) are kept and ignored:
      CEL rules cannot be checked without an API server.
    """
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crds() -> list[tuple[Path, dict]]:
    """The published KubeRay CustomResourceDefinitions (ray.io_rayclusters.yaml,
    ray.io_rayjobs.yaml from ray-project/kuberay ray-operator/config/crd/bases/), parsed once:
    they are megabytes of YAML."""
    crd_dir = shared_data_dir("kuberay-crds")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = [(f, yaml.load(f.read_text(), Loader=loader)) for f in sorted(crd_dir.glob("*.yaml"))]
    return [(f, d) for f, d in docs if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str) -> jsonschema.Validator:
    """A validator for ``kind`` at ``api_version`` from the published KubeRay CRDs."""
    group, version = api_version.split("/")
    for f, crd in _crds():
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version:
                schema = _openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
                return jsonschema.Draft7Validator(schema)
        raise AssertionError(f"{f.name} has no version {version} of {kind}")
    raise AssertionError(f"no CRD for {kind} ({group}) in {shared_data_dir('kuberay-crds')}")


def errors_of(validator: jsonschema.Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def load_manifest(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: expected one manifest, got {len(docs)}"
    return docs[0]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def containers(spec: dict):
    yield spec["headGroupSpec"]["template"]["spec"]["containers"], "head"
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]["spec"]["containers"], group["groupName"]


# ------------------------------------------------------------ launcher YAMLs


def test_launcher_yamls_exist():
    assert {p.name for p in LAUNCHER} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_matches_the_schema_shipped_with_ray(path: Path):
    config = yaml.safe_load(path.read_text())
    assert errors_of(jsonschema.Draft7Validator(ray_cluster_schema()), config) == []
    # Cross-field facts the schema cannot express.
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker node type is required"
    assert all(types[n].get("max_workers", 0) >= 1 for n in gpu_types)
    assert config["provider"]["type"] == path.stem
    # The project is installed on every node.
    assert any("pip install" in c and "tripost-ray" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_never_embeds_keys_and_keeps_the_dashboard_local(path: Path):
    text = path.read_text()
    assert not LITERAL_KEY.search(text)
    config = yaml.safe_load(text)
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"]
                        + config["setup_commands"] + config.get("initialization_commands", []))
    for name in SECRET_ENV:
        # Keys reach the nodes only through the secret-store helper, never as a literal.
        assert not re.search(rf"{name}\s*=\s*['\"]?[A-Za-z0-9]", commands), name
    assert f"secrets_env.sh {path.stem}" in commands
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_launcher_schema_check_catches_a_typo():
    config = yaml.safe_load((CLUSTERS / "launcher" / "aws.yaml").read_text())
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    bad_type = copy.deepcopy(yaml.safe_load((CLUSTERS / "launcher" / "aws.yaml").read_text()))
    bad_type["max_workers"] = "two"
    validator = jsonschema.Draft7Validator(ray_cluster_schema())
    assert any("head_start_ray_command" in e for e in errors_of(validator, config))
    assert any(e.startswith("max_workers") for e in errors_of(validator, bad_type))


# ---------------------------------------------------------- KubeRay manifests


def test_kuberay_manifests_exist():
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_published_crd(path: Path):
    manifest = load_manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert errors_of(crd_validator(manifest["kind"], manifest["apiVersion"]), manifest) == []


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_a_gpu_worker_group(path: Path):
    spec = cluster_spec(load_manifest(path))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits is required"
    for g in gpu_groups:
        limit = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert g["rayStartParams"]["num-gpus"] == str(limit), g["groupName"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert spec["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_keys_come_only_from_secrets(path: Path):
    text = path.read_text()
    assert not LITERAL_KEY.search(text)
    for ctrs, group in containers(cluster_spec(load_manifest(path))):
        for c in ctrs:
            env = {e["name"]: e for e in c.get("env", [])}
            for name in SECRET_ENV:
                assert name in env, f"{group}: {name} is not mounted"
                assert "value" not in env[name], f"{group}: {name} has a literal value"
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], f"{group}: {name} secretKeyRef is incomplete"
            assert env["TRIPOST_STORAGE"]["value"].startswith(("s3://", "gs://"))


def test_rayjob_entrypoint_runs_a_valid_job_config():
    manifest = load_manifest(CLUSTERS / "kuberay" / "rayjob.yaml")
    head_env = {e["name"]: e.get("value") for e in
                cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    # The entrypoint runs in a shell on the head; expand $VARS from the head's env.
    command = manifest["spec"]["entrypoint"].split("&&")[-1]
    argv = [re.sub(r"\$(\w+)", lambda m: head_env[m.group(1)], a) for a in shlex.split(command)]
    assert argv[:2] == ["tripost", "run"]
    config, overrides = argv[2], [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert config == "jobs/reproduce_llama7b_gpu.yaml"
    cfg = load_config(ROOT / config, overrides)
    assert cfg.storage.path == head_env["TRIPOST_STORAGE"] and cfg.model.source == head_env["TRIPOST_MODEL"]
    assert cfg.train.num_workers <= sum(
        int(g["rayStartParams"].get("num-gpus", 0)) * g["maxReplicas"]
        for g in cluster_spec(manifest)["workerGroupSpecs"])


def test_secret_example_holds_no_value():
    doc = load_manifest(CLUSTERS / "kuberay" / "secret-example.yaml")
    assert doc["kind"] == "Secret"
    assert doc["stringData"] and all(v == "" for v in doc["stringData"].values())


def test_crd_check_catches_typos_wrong_types_and_missing_fields():
    manifest = load_manifest(CLUSTERS / "kuberay" / "raycluster.yaml")
    validator = crd_validator("RayCluster", "ray.io/v1")
    typo = copy.deepcopy(manifest)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    missing = copy.deepcopy(manifest)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    env_typo = copy.deepcopy(manifest)
    env_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"] = {
        "secretKeyRf": {"name": "x", "key": "y"}}
    assert any("workerGroupSpec'" in e for e in errors_of(validator, typo))
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas") for e in errors_of(validator, wrong_type))
    assert any("groupName" in e for e in errors_of(validator, missing))
    assert any("secretKeyRf" in e for e in errors_of(validator, env_typo))


def test_crds_are_read_from_shared_not_copied_into_the_project():
    copies = [p for p in ROOT.rglob("ray.io_ray*.yaml") if ".venv" not in p.parts]
    assert copies == []


# ------------------------------------------------------------- local cluster

LOCAL = CLUSTERS / "local"


@pytest.mark.parametrize("script", sorted(LOCAL.glob("*.sh")) + [CLUSTERS / "launcher" / "secrets_env.sh"],
                         ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (the cluster's own dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.integration
@pytest.mark.slow
def test_local_script_starts_head_and_workers_and_stops_only_them():

    # A short dir: Ray's unix sockets live under it and have a ~107-byte path limit.
    cluster_dir = Path(tempfile.mkdtemp(prefix="trc"))
    port, dash = _free_port(), _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_PORT": str(port),
           "DASHBOARD_PORT": str(dash), "HEAD_CPUS": "1", "WORKER_CPUS": "1", "WORKER_GPUS": "1",
           "CLUSTER_DIR": str(cluster_dir), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    try:
        started = subprocess.run(["bash", str(LOCAL / "start_local_cluster.sh"), "1"], env=env,
                                 capture_output=True, text=True, timeout=400)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"127.0.0.1:{port}" in started.stdout and f"http://127.0.0.1:{dash}" in started.stdout
        pids = [int((cluster_dir / f"{n}.pid").read_text()) for n in ("head", "worker1")]
        # Two nodes with the resources the script gave them, seen from a separate driver.
        probe = subprocess.run(
            [sys.executable, "-c",
             "import json, ray; ray.init(address=%r, log_to_driver=False); "
             "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % f"127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        resources = json.loads(probe.stdout.strip().splitlines()[-1])
        assert sorted((r.get("CPU"), r.get("GPU", 0.0)) for r in resources) == [(1.0, 0.0), (1.0, 1.0)]
    finally:
        stopped = subprocess.run(["bash", str(cluster_dir / "stop.sh")], env=env,
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert _pids_with(str(cluster_dir)) == []
    shutil.rmtree(cluster_dir, ignore_errors=True)
