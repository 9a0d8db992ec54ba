"""The Kubernetes manifests and the Dockerfile, checked offline (issue 15, item 1).

Manifests are validated with `jsonschema` against the facts of KubeRay's v1 CRD schemas, vendored
in kuberay_v1_facts.json from github.com/ray-project/kuberay (ray-operator/config/crd/bases) by
scripts/vendor_kuberay_schema.py. No `hadolint` installs through pip here, so the Dockerfile rules
that matter to us are checked directly (rule numbers are hadolint's).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import load_job

ROOT = Path(__file__).resolve().parents[2]
FACTS = json.loads((Path(__file__).parent / "kuberay_v1_facts.json").read_text())
MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))


def docs() -> list[dict]:
    return [d for m in MANIFESTS for d in yaml.safe_load_all(m.read_text()) if d]


def ray_docs() -> list[dict]:
    return [d for d in docs() if d["kind"] in FACTS["kinds"]]


def validate(doc: dict) -> None:
    kind = FACTS["kinds"][doc["kind"]]
    assert doc["apiVersion"] == kind["apiVersion"]
    jsonschema.Draft7Validator(kind["schema"]).validate(doc)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_there_is_a_raycluster_and_a_rayjob():
    assert {d["kind"] for d in ray_docs()} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("doc", ray_docs(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_matches_the_kuberay_crd(doc):
    validate(doc)


def test_the_schema_catches_mistakes():
    """The vendored facts are strict enough to fail the mistakes people make."""
    base = next(d for d in ray_docs() if d["kind"] == "RayCluster")
    typo = copy.deepcopy(base)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    wrong_type = copy.deepcopy(base)
    wrong_type["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "8"
    no_template = copy.deepcopy(base)
    del no_template["spec"]["headGroupSpec"]["template"]
    container_typo = copy.deepcopy(base)
    container_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    for bad in (typo, wrong_type, no_template, container_typo):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


@pytest.mark.parametrize("doc", ray_docs(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_groups_place_the_work(doc):
    """CPU head that schedules only, CPU preprocess workers, GPU engine workers; all autoscaled."""
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    assert all(c["image"].endswith(":cpu") for c in head_pod["containers"])
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head_pod["containers"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-preprocess", "gpu-engine"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = groups["gpu-engine"]["template"]["spec"]["containers"][0]
    assert gpu["image"].endswith(":gpu") and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = groups["cpu-preprocess"]["template"]["spec"]["containers"][0]
    assert cpu["image"].endswith(":cpu") and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    pods = [head_pod, *(g["template"]["spec"] for g in groups.values())]
    assert all(p["serviceAccountName"] == "cpmv" for p in pods)  # IRSA: credentials from the role


def test_rayjob_runs_a_shipped_job_from_the_mounted_configmap(monkeypatch):
    job = next(d for d in ray_docs() if d["kind"] == "RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["cpmv", "run"] and argv[2].startswith("/jobs/")
    shipped = ROOT / "jobs" / Path(argv[2]).name
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)  # IRSA: no keys in the environment, and it still validates
    assert all(flag == "--set" for flag in argv[3::2])
    cfg = load_job(shipped, argv[4::2])
    assert cfg.ray.address is None and cfg.engine.kind == "vllm"
    assert cfg.storage.s3.access_key_id is None
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/jobs"]]["configMap"]["name"] == "cpmv-jobs"


def test_ray_versions_agree():
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"ray\[data(?:,default)?\]>=([\d.]+),<([\d.]+)"', pyproject).groups()
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    image = re.search(r"ARG RAY_VERSION=([\d.]+)", dockerfile).group(1)

    def v(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in s.split("."))

    assert v(low) <= v(image) < v(high)
    for doc in ray_docs():
        assert cluster_spec(doc)["rayVersion"] == image


# -- Dockerfile ------------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "infra" / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_a_cpu_and_a_gpu_image():
    stages = [re.search(r"\bAS\s+(\S+)", arg, re.I).group(1) for op, arg in _instructions() if op == "FROM"]
    assert stages == ["cpu", "gpu"]
    assert '".[vllm]"' in DOCKERFILE  # the engine image carries vLLM


def test_dockerfile_hadolint_rules():
    args = {m.group(1): m.group(2) for m in re.finditer(r"ARG (\w+)=(\S+)", DOCKERFILE)}
    stage_user = None
    for op, arg in _instructions():
        if op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg.split()[0])
            assert ":" in image and not image.endswith(":latest"), f"DL3006/DL3007: pin {image}"
            if stage_user is not None:
                assert stage_user != "root", "DL3002: last USER of a stage must not be root"
            stage_user = "root?"
        elif op == "RUN" and "pip install" in arg:
            for cmd in arg.split("&&"):
                if "pip install" in cmd:
                    assert "--no-cache-dir" in cmd, f"DL3042: {cmd.strip()}"
        elif op == "USER":
            stage_user = arg.strip()
        elif op == "COPY":
            assert "jobs" not in arg.split(), "job files are mounted or fetched, not baked into the image"
        assert op not in ("MAINTAINER",), "DL4000"
    assert stage_user not in (None, "root", "root?"), "DL3002: the image must end as a non-root user"


def test_dockerfile_pins_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text()
    for name in ("TORCH_PIN", "TORCHVISION_PIN"):
        pin = re.search(rf"^{name} := (\S+)", makefile, re.M).group(1)
        assert re.search(rf"ARG {name}={re.escape(pin)}$", DOCKERFILE, re.M), name
        assert f"$({name})" in makefile.split("image-cpu:")[1]  # passed to the build, not only defaulted
