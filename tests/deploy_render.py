"""deploy/k8s/render.py (a script, not a package) for the deployment tests: the
kustomize base rendered offline, and its image and pod-spec helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RENDER_PY = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "render.py"
_spec = importlib.util.spec_from_file_location("cplane_deploy_render", RENDER_PY)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

render = _module.render
pod_spec = _module.pod_spec
split_image = _module.split_image
K8S_DIR = _module.HERE

__all__ = ["K8S_DIR", "RENDER_PY", "pod_spec", "render", "split_image"]
