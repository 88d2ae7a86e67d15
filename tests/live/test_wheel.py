"""The wheel as a user installs it: one top-level name (`cplane`), so it sits beside
another project's top-level `client` module, and `cplane up` + one request work
from the installed copy (not this checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.waiting import until_up

ROOT = Path(__file__).resolve().parents[2]
# Builds the wheel and a fresh venv (about 20 s, 11 s of CPU): `make test`, not test-fast.
pytestmark = pytest.mark.slow


def _other_wheel(out: Path) -> Path:
    """A wheel of another project, `someone-client`, owning a top-level `client` module."""
    path = out / "someone_client-1.0-py3-none-any.whl"
    info = "someone_client-1.0.dist-info"
    files = {
        "client/__init__.py": "WHO = 'someone else'\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: someone-client\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{info}/top_level.txt": "client\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel and the other project installed. The
    dependencies come from this environment's site-packages (a path entry: its
    own .pth files, among them this checkout's editable finder, are not run)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = dist.glob("cplane-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"cplane"}
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel), str(_other_wheel(tmp))], check=True, capture_output=True,
                   timeout=300)
    server = Path(sysconfig.get_path("scripts")) / "nats-server"
    (venv / "bin" / "nats-server").symlink_to(server)
    return venv


def test_the_wheel_installs_one_name_beside_a_top_level_client(installed: Path,
                                                               tmp_path: Path) -> None:
    py = installed / "bin" / "python"
    code = ("import client, cplane, cplane.client, cplane.orchestrator.service;"
            "print(client.WHO, cplane.client.Client.__module__, cplane.__file__)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout.split()
    assert out[:3] == ["someone", "else", "cplane.client.sdk"]
    assert str(installed) in out[3] and str(ROOT) not in out[3]  # the installed copy


def test_cplane_up_and_one_request_from_the_installed_wheel(installed: Path,
                                                            tmp_path: Path) -> None:
    cplane = str(installed / "bin" / "cplane")
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PYTHONPATH")}
    log = tmp_path / "up.log"
    with open(log, "w") as fh:
        up = subprocess.Popen([cplane, "up", "--zero-cost"], stdout=fh, stderr=subprocess.STDOUT,
                              cwd=tmp_path, env=env)
    try:
        url = until_up(up, log, 90, "`cplane up` from the wheel to say it is up")
        res = subprocess.run([cplane, "generate", "hello from the wheel", "--max-tokens", "8",
                              "--nats-url", url], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.split()) == 8 and "8 tokens" in res.stderr
    finally:
        up.terminate()
        up.wait(60)
    assert up.returncode == 0, log.read_text()[-2000:]
