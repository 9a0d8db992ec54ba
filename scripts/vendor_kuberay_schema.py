"""Cut KubeRay's CRD schemas down to the facts our manifests touch: tests/k8s/kuberay_v1_facts.json.

Source: github.com/ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
ray.io_rayjobs.yaml (the v1 `openAPIV3Schema` of each). The full files are ~2 MB (every pod field);
this keeps, along every path our manifests use, the node's type, enum, format, pattern, anyOf,
required list and the names of all its properties (so a misspelt field is still an error), and
drops the subtrees of fields we do not use. Rerun after changing a manifest or moving KubeRay:

    python scripts/vendor_kuberay_schema.py CRD_DIR infra/k8s/*.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KEEP = ("type", "enum", "format", "pattern", "required", "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields", "minimum", "maximum")


def trim(schema: dict, value: object) -> dict:
    """`schema` reduced to what validating `value` (one manifest's data at this node) needs."""
    out = {k: schema[k] for k in KEEP if k in schema}
    if "anyOf" in schema:
        out["anyOf"] = [{k: s[k] for k in KEEP if k in s} for s in schema["anyOf"]]
    props = schema.get("properties")
    if props is not None:
        used = value if isinstance(value, dict) else {}
        out["properties"] = {name: trim(sub, used[name]) if name in used else {k: sub[k] for k in ("type",) if k in sub}
                             for name, sub in props.items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    elif isinstance(schema.get("additionalProperties"), dict):
        merged: dict = {}
        for v in (value.values() if isinstance(value, dict) else []):
            merged = _merge(merged, v)
        out["additionalProperties"] = trim(schema["additionalProperties"], merged or None)
    if isinstance(schema.get("items"), dict):
        merged = {}
        for v in (value if isinstance(value, list) else []):
            merged = _merge(merged, v)
        out["items"] = trim(schema["items"], merged or (value[0] if isinstance(value, list) and value else None))
    return out


def _merge(a: object, b: object) -> object:
    """The union of two manifest values' keys (so every field any manifest uses is kept)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a.get(k), b.get(k)) if k in a and k in b else (a.get(k) if k in a else b[k])
                for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        merged: object = {}
        for v in [*a, *b]:
            merged = _merge(merged, v) if isinstance(v, dict) else v
        return [merged]
    return b if b is not None else a


def main(crd_dir: str, manifests: list[str]) -> None:
    docs = [d for m in manifests for d in yaml.safe_load_all(Path(m).read_text()) if d]
    facts = {"source": "https://github.com/ray-project/kuberay/tree/master/ray-operator/config/crd/bases",
             "kinds": {}}
    for kind, plural in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        crd = yaml.safe_load((Path(crd_dir) / f"ray.io_{plural}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        used: object = {}
        for d in docs:
            if d.get("kind") == kind:
                used = _merge(used, d)
        facts["kinds"][kind] = {"apiVersion": f"{crd['spec']['group']}/v1",
                                "schema": trim(version["schema"]["openAPIV3Schema"], used)}
    out = Path(__file__).resolve().parents[1] / "tests" / "k8s" / "kuberay_v1_facts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
