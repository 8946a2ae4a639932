"""The wheel installs everything under the `gravprobe` import root, and ships the Hydra configs."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True)
    (whl,) = out.glob("gravprobe-*.whl")
    return zipfile.ZipFile(whl).namelist()


def test_wheel_uses_gravprobe_namespace(wheel_files):
    for pkg in ("orbits", "attention", "kernels", "probes", "pretrain"):
        assert f"gravprobe/{pkg}/__init__.py" in wheel_files
    assert "gravprobe/cli.py" in wheel_files
    tops = {name.split("/")[0] for name in wheel_files}
    assert not tops & {"orbits", "attention", "kernels", "probes", "pretrain", "conf"}, tops


def test_wheel_ships_configs(wheel_files):
    assert "gravprobe/conf/config.yaml" in wheel_files
    for group in ("data", "model", "attention", "train", "experiment"):
        assert any(f.startswith(f"gravprobe/conf/{group}/") and f.endswith(".yaml") for f in wheel_files), group
    assert "gravprobe/conf/experiment/smoke.yaml" in wheel_files
