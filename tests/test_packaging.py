"""Installing without make: a built wheel holds every module, the presets and protocols (YAML package data), the
``carlrar`` console script and the optional extras; ``carlrar --version``; a missing optional dependency is a
one-line error naming its extra."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import carlrar
from carlrar.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "carlrar"


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the tree (a build writes build/ and *.egg-info beside the sources), offline."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("the build backend (setuptools) is not installed here, and offline pip cannot fetch it")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheels"), str(tree)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("carlrar-*.whl")
    return wheel


def test_the_wheel_holds_modules_package_data_script_and_extras(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"carlrar-{carlrar.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
               if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    assert {n for n in on_disk if n.endswith(".yaml")} >= {"carlrar/presets/sst2.yaml", "carlrar/protocols/cpu.yaml"}
    assert on_disk - names == set()  # every module, preset and protocol
    info = f"carlrar-{carlrar.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        scripts = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
    assert "carlrar = carlrar.cli:main" in scripts
    assert {"Provides-Extra: search", "Provides-Extra: plots", "Provides-Extra: dev"} <= set(metadata.splitlines())
    assert "Requires-Dist: optuna>=4; extra == \"search\"" in metadata
    assert "Requires-Dist: optuna>=4\n" not in metadata  # not a core dependency


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out == f"carlrar {carlrar.__version__}\n"


@pytest.mark.parametrize("module, extra, argv", [("optuna", "search", ["search", "--study-dir", "{tmp}/study"]),
                                                 ("matplotlib", "plots", ["report", "{tmp}"])])
def test_a_missing_optional_dependency_names_its_extra(module, extra, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec gives None
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: carlrar {argv[0]} needs {module}: pip install 'carlrar[{extra}]'\n"
