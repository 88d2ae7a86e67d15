"""Render this kustomize base without kubectl: what `kubectl kustomize deploy/k8s` prints.

    python deploy/k8s/render.py [deploy/k8s] > cplane.yaml

Applies the features the base uses, and refuses any other (so a new feature in
kustomization.yaml cannot be skipped silently here):

- `resources`: files, in order, each one or more YAML documents;
- `namespace`: set on every namespaced object (not on a Namespace or another
  cluster-scoped kind);
- `images`: a container or init container whose image name (without tag or
  digest) equals `name` gets `newName` and `newTag` or `digest`.

The offline tests (tests/unit/test_k8s_manifests.py) validate its output
against the pinned Kubernetes and KEDA schemas; users apply the base with
`kubectl apply -k deploy/k8s`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
# Where a workload kind keeps its pod spec.
POD_SPEC_PATHS = {"Pod": ("spec",), "Deployment": ("spec", "template", "spec"),
                  "StatefulSet": ("spec", "template", "spec"),
                  "DaemonSet": ("spec", "template", "spec"),
                  "ReplicaSet": ("spec", "template", "spec"),
                  "Job": ("spec", "template", "spec"),
                  "CronJob": ("spec", "jobTemplate", "spec", "template", "spec")}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload object, None for other kinds."""
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else None


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference (a registry port is not a tag)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _set_image(image: str, rules: list[dict[str, Any]]) -> str:
    name, tag, digest = split_image(image)
    for rule in rules:
        if rule.get("name") != name:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            tag = str(rule["newTag"])
        break
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as fh:
        for doc in yaml.safe_load_all(fh):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise ValueError(f"{path}: not a Kubernetes object: {str(doc)[:80]}")
            yield doc


def render(base: Path = HERE) -> list[dict[str, Any]]:
    """The objects of the kustomization in `base`, transformed as kustomize would."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"kustomization.yaml uses {sorted(unknown)}: render.py applies only "
                         f"{sorted(SUPPORTED)}; extend it (and its tests) first")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = base / entry
        if not path.is_file():
            raise ValueError(f"resource {entry!r}: render.py reads files only")
        objects.extend(_documents(path))
    namespace = kustomization.get("namespace")
    rules = kustomization.get("images", [])
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = namespace
        spec = pod_spec(obj)
        for container in [*(spec or {}).get("containers", []),
                          *(spec or {}).get("initContainers", [])]:
            container["image"] = _set_image(container["image"], rules)
    return objects


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", nargs="?", type=Path, default=HERE,
                    help="the folder holding kustomization.yaml (default: this one)")
    args = ap.parse_args(argv)
    yaml.safe_dump_all(render(args.base), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
