"""A normal (non-editable) install runs the CLI from any directory: the wheel built from this checkout holds every
module, the configs as real files, the bundled model, the C++ kernel sources and the `qwenjax` command."""

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qwenjax", "pallas_kernels")
# Not part of a source tree: version control, caches and the products of earlier builds.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", ".whl", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of the checkout: setuptools stages files in the source tree's build/, and what an earlier
    # build left there goes into the wheel too, hiding a file the package data no longer names.
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", symlinks=True, ignore=NOT_SOURCES)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(tmp / "src"),
                            "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    (path,) = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def _needed_files() -> dict[str, Path]:
    """The path in the wheel of every checkout file an installed qwenjax needs, with that file."""
    needed = {}
    for package in PACKAGES:
        for pattern in ("**/*.py", "**/*.cc"):  # the modules; C++ kernels compiled on the user's machine
            needed.update({f.relative_to(ROOT).as_posix(): f for f in (ROOT / package).glob(pattern)})
    needed.update({f"qwenjax/configs/{f.name}": f for f in (ROOT / "configs").glob("*.json")})  # --config NAME
    for model in ("tiny-pydoc", "tiny-vision"):  # the default models of `qwenjax generate` (--image)
        needed.update({f.relative_to(ROOT).as_posix(): f
                       for f in (ROOT / "qwenjax" / "assets" / model).iterdir() if f.is_file()})
    return needed


def test_the_wheel_holds_every_file_the_cli_and_the_bundled_model_need(wheel):
    needed = _needed_files()
    assert "qwenjax/configs/tiny.json" in needed and "qwenjax/assets/tiny-pydoc/model.safetensors" in needed
    assert "qwenjax/assets/tiny-vision/example.png" in needed
    held = set(wheel.namelist())
    missing = sorted(name for name in needed if name not in held)
    # a config packed as a link (or anything stale) would not hold the checkout's bytes
    different = sorted(name for name in needed if name in held and wheel.read(name) != needed[name].read_bytes())
    assert not missing and not different, (
        f"the wheel lacks {len(missing)} file(s): {', '.join(missing) or '-'}; "
        f"{len(different)} differ from the checkout: {', '.join(different) or '-'}")


def test_the_wheel_installs_the_qwenjax_command(wheel):
    found = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    assert found, "the wheel has no .dist-info/entry_points.txt: no console script is installed"
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(found[0]).decode())
    assert entry_points.get("console_scripts", "qwenjax", fallback=None) == "qwenjax.cli:main", (
        f"{found[0]} does not install `qwenjax = qwenjax.cli:main`:\n{wheel.read(found[0]).decode()}")
