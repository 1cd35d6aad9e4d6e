"""The wheel carries what an installed package needs: the configs the toy-world driver reads."""

import subprocess
import sys
import zipfile

from eaft_pl.experiments.toyworld import driver
from tests.conftest import REPO


def test_the_driver_reads_its_configs_from_the_package():
    package = REPO / "eaft_pl"
    assert driver.CONFIGS.is_dir() and package.resolve() in driver.CONFIGS.resolve().parents
    assert driver.PRETRAIN.is_file() and driver.FINETUNE.is_file()
    assert all((driver.METHODS / f"{m}.yaml").is_file() for m in driver.ALL_METHODS)
    assert (REPO / "configs").resolve() == (package / "configs").resolve()  # the checkout's link


def test_the_wheel_holds_every_shipped_config(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("eaft_pl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "eaft_pl" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "eaft_pl/experiments/toyworld/driver.py" in names
