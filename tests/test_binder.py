"""binder/ (mybinder.org, repo2docker) stays consistent with pyproject, scripts/setup.sh and the notebooks."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"
NOTEBOOKS = REPO / "notebooks"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a pip requirements file."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def torch_pin(text: str) -> str:
    pins = set(re.findall(r"torch==([0-9][0-9A-Za-z.+]*)", text))
    assert len(pins) == 1, f"expected exactly one torch==VERSION pin, found {sorted(pins) or 'none'}"
    return pins.pop()


def requirement_names(specs: list[str]) -> set[str]:
    """Distribution names in dependency specs such as 'ipywidgets>=8' or 'vlmlab[notebook]'."""
    return {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


# ---- the files repo2docker reads ---------------------------------------------------------------

def test_binder_files_exist():
    for name in ("runtime.txt", "requirements.txt", "postBuild"):
        assert (BINDER / name).is_file(), f"binder/{name} is missing"


def test_runtime_python_within_requires_python():
    from packaging.specifiers import SpecifierSet

    text = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(\d+\.\d+)", text)
    assert m, f"binder/runtime.txt should read 'python-X.Y' (repo2docker), not {text!r}"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(m.group(1) + ".0"), f"Python {m.group(1)} is outside requires-python {requires}"


def test_requirements_pin_cpu_torch_like_setup_sh():
    lines = requirement_lines(BINDER / "requirements.txt")
    setup_pin = torch_pin((REPO / "scripts" / "setup.sh").read_text())
    assert torch_pin("\n".join(lines)) == setup_pin, "binder and scripts/setup.sh must pin the same torch"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines, \
        "name the PyTorch CPU wheel index with --extra-index-url, or pip takes PyPI's CUDA build"
    torch_lines = [ln for ln in lines if re.match(r"torch\b", ln)]
    assert torch_lines == [f"torch=={setup_pin}"], f"one exact torch pin and nothing else for torch: {torch_lines}"
    # torch is within the package's own requirement
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    torch_req = next(r for r in deps if r.name == "torch")
    assert torch_req.specifier.contains(setup_pin), f"torch=={setup_pin} is outside pyproject's {torch_req}"


def test_postbuild_installs_this_package_with_the_notebook_extra():
    path = BINDER / "postBuild"
    text = path.read_text()
    assert text.startswith("#!"), "postBuild needs a shebang line"
    assert os.access(path, os.X_OK), "postBuild must be executable (git update-index --chmod=+x binder/postBuild)"
    assert re.search(r"^set -[a-z]*e", text, re.M), "postBuild should stop at the first failing command (set -e)"
    installs = [ln for ln in text.splitlines() if re.search(r"\bpip install\b", ln) and not ln.lstrip().startswith("#")]
    assert installs, "postBuild does not pip install anything"
    assert any(re.search(r"""(-e\s+)?["']?\.\[notebook\]["']?(\s|$)""", ln) for ln in installs), \
        f"postBuild should install this package with its notebook extra ('.[notebook]'): {installs}"
    assert not re.search(r"jupyter\s+(nb|lab|server)?extension", text), "postBuild should enable nothing else"


def test_notebook_extra_brings_the_notebook_stack():
    extras = pyproject()["project"]["optional-dependencies"]
    names = requirement_names(extras["notebook"])
    for needed in ("ipywidgets", "jupyterlab", "ipython"):
        assert needed in names, f"the notebook extra lacks {needed}: {extras['notebook']}"
    assert "vlmlab[notebook]" in extras["dev"], "the dev extra should include the notebook extra"


# ---- links to notebooks ------------------------------------------------------------------------

def binder_links() -> list[tuple[str, str]]:
    """(file, notebook path) for every mybinder link with urlpath=lab/tree/... in the README and binder/."""
    found = []
    for doc in [REPO / "README.md", *sorted(BINDER.glob("*.md"))]:
        if doc.is_file():
            for m in re.finditer(r"mybinder\.org/v2/\S*?urlpath=(?:lab/tree/|tree/)([^\s)&\"'>]+)", doc.read_text()):
                found.append((doc.name, m.group(1)))
    return found


def test_binder_links_name_existing_notebooks():
    links = binder_links()
    assert links, "no mybinder link with urlpath=lab/tree/... in README.md or binder/*.md"
    for doc, target in links:
        assert (REPO / target).is_file(), f"{doc} links to {target}, which does not exist"
    assert any(t == "notebooks/01-quickstart.ipynb" for _, t in links), "the Binder should launch the quickstart"


def tutorial_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_tutorials_exist():
    names = {p.name for p in tutorial_notebooks()}
    for needed in ("00-dashboard.ipynb", "01-quickstart.ipynb", "02-device-maps.ipynb",
                   "03-multi-gpu-strategies.ipynb", "04-profiling.ipynb", "05-precision.ipynb"):
        assert needed in names, f"notebooks/{needed} is missing"


@pytest.mark.parametrize("path", tutorial_notebooks(), ids=lambda p: p.name)
def test_notebook_kernel_and_links(path):
    nb = json.loads(path.read_text())
    kernel = nb.get("metadata", {}).get("kernelspec", {})
    assert kernel.get("name") == "python3", f"{path.name}: kernelspec should be python3 (the environment's ipykernel)"
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for target in re.findall(r"\]\(([^)\s#]+\.ipynb)\)", text):
            assert (path.parent / target).is_file(), f"{path.name} links to {target}, which does not exist"


@pytest.mark.parametrize("path", tutorial_notebooks(), ids=lambda p: p.name)
def test_notebook_outputs_stay_small(path):
    """Committed with outputs, but no huge blobs: a few plots at most."""
    assert path.stat().st_size < 1_500_000, f"{path.name} is {path.stat().st_size} bytes; strip or shrink outputs"
