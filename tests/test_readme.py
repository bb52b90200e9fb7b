"""The README's commands run as written, so it cannot drift from the code.

Every fenced block of the README is a command block tagged on the line before it,
``<!-- run -->`` (seconds), ``<!-- long -->`` (minutes) or ``<!-- needs: ... -->``
(a GPU, a download, a checkpoint the user brings), or a ``text`` block. The
``run`` blocks are run in order, in a temp dir, as bash (``python`` blocks with
python). What the ``long`` blocks before them make is stood in for: the
quickstart's search, by a plan of the same name and NFE (uniform timesteps);
its build (the default backend's bf16 FID gate takes minutes), by the same
``build`` command on onnxruntime.
The serving block's port 8000 becomes a free port (the machine may be shared).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TAGS = ("run", "long", "needs")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
TAG = re.compile(r"<!-- (\w+)(?::[^>]*)? -->\n$")


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """[(tag, language, code)] for every fenced block; tag '' when the block is untagged."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()]
        tag = TAG.search(before[before.rfind("\n", 0, len(before) - 1) + 1:])
        out.append((tag.group(1) if tag else "", m.group(1), m.group(2)))
    return out


def test_the_block_reader_sees_tags_and_languages():
    text = "x\n<!-- run -->\n```\nls\n```\n\n<!-- needs: a GPU -->\n```python\nimport os\n```\n```text\ntree\n```\n"
    assert readme_blocks(text) == [("run", "", "ls\n"), ("needs", "python", "import os\n"), ("", "text", "tree\n")]


def test_every_command_block_is_tagged():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    untagged = [code.splitlines()[0] for tag, lang, code in blocks if tag not in TAGS and lang != "text"]
    assert not untagged, f"README command blocks without a run/long/needs tag: {untagged}"
    assert sum(tag == "run" for tag, _, _ in blocks) >= 4


def test_no_readme_command_writes_into_the_package():
    """No command overwrites a committed file by default: every --out is a new path outside the package."""
    committed = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    outs = [m.group(1) for tag, lang, code in readme_blocks(README.read_text()) if lang != "text"
            for m in re.finditer(r"--out[ =](\S+)", code)]
    assert outs
    packages = ("autodiffusion_rt/", "search/", "export/", "kernels/", "tests/", "scripts/")
    bad = [o for o in outs if o in committed or o.startswith(packages)]
    assert not bad, bad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_in_for_the_quickstart_search(folder: Path) -> None:
    from autodiffusion_rt import load_model
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.plan import Plan

    model = load_model("embedded:mnist")
    timesteps = uniform_timesteps(model.num_timesteps, 4, "quadratic")
    plan = Plan.for_model(model, timesteps, sampler="dpmpp_2m", spec="embedded:mnist")
    plan.save(folder / "plans" / "embedded-mnist-nfe4.json")


@pytest.mark.slow
def test_the_run_blocks_run_as_written(tmp_path):
    if shutil.which("curl") is None or shutil.which("autodiffusion-rt") is None:
        pytest.skip("needs curl and the installed console script")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    (tmp_path / "plans").mkdir()
    _stand_in_for_the_quickstart_search(tmp_path)
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    build = [code for tag, _, code in readme_blocks(README.read_text())
             if tag == "long" and code.startswith("autodiffusion-rt build")]
    assert len(build) == 1, "the quickstart's build block"
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", build[0].strip() + " --backend onnxruntime --quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    blocks = [(lang, code) for tag, lang, code in readme_blocks(README.read_text()) if tag == "run"]
    trained_by = []  # what `autodiffusion-rt info` (a run block) says trained the embedded model
    for k, (lang, code) in enumerate(blocks):
        if lang == "python":
            argv = [sys.executable, "-W", "error::UserWarning", "-c", code]
        else:
            code = code.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
            argv = ["bash", "-euo", "pipefail", "-c", code]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        where = f"README run block {k + 1} ({code.splitlines()[0][:60]!r})"
        assert out.returncode == 0, f"{where} exited {out.returncode}: {out.stderr[-2000:]}"
        assert "Traceback" not in out.stderr, f"{where}: {out.stderr[-2000:]}"
        assert not re.search(r"autodiffusion_rt/\S+\.py:\d+: \w*Warning", out.stderr), f"{where}: {out.stderr[-2000:]}"
        trained_by += [line.split("trained by", 1)[1].strip() for line in out.stdout.splitlines()
                       if line.startswith("trained by")]
    for name in ("fast.png", "grid.png", "threes.png", "x.npy", "digits.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # `info` prints the training command, and it is the README's own (a long block)
    long_blocks = [code for tag, _, code in readme_blocks(README.read_text()) if tag == "long"]
    assert len(trained_by) == 1, "one run block runs `autodiffusion-rt info`, which prints 'trained by ...'"
    assert any(trained_by[0] in code.splitlines() for code in long_blocks), trained_by[0]
