"""pyproject lists its packages by hand (kernels/ installs as `forge_kernels`, so setuptools'
finder cannot be used): every folder of Python modules under flows/ and stages/ must be listed, or
an installed worker image would lack it; kernels/ must stay a folder without __init__.py, or a
process started in the repository would take it for Hugging Face's `kernels` package."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {".".join(d.relative_to(ROOT).parts) for top in ("flows", "stages")
               for d in [ROOT / top, *(ROOT / top).rglob("*")]
               if d.is_dir() and any(d.glob("*.py"))}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert setup["package-dir"]["forge_kernels"] == "kernels" and "forge_kernels" in listed


def test_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import kernels, forge_kernels.logprobs; "
                          "print(kernels.__file__); print(forge_kernels.logprobs.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not out[0].startswith(str(ROOT / "kernels")), out   # Hugging Face's, not ours
    assert out[1] == str(ROOT / "kernels" / "logprobs.py")
