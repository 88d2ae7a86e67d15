"""deploy/k8s/render.py against the real thing: where kubectl is installed, `kubectl
kustomize deploy/k8s` gives exactly the objects render.py gives, so the offline
checks of tests/unit/test_k8s_manifests.py look at what `kubectl apply -k` applies."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy_render import K8S_DIR, render


def _by_name(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_k8s_render_matches_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: tests/unit/test_k8s_manifests.py checks render.py alone")
    out = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    # kustomize orders objects by kind; the objects themselves must be equal
    assert _by_name(list(yaml.safe_load_all(out))) == _by_name(render())
