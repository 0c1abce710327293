"""The wheel, as a user gets it: built by scripts/build_wheel.sh from a clean clone (the committed
state: commit before running this), repaired by auditwheel to a manylinux tag without grafting
torch's libraries, pinned to this torch, installed with its dependencies into a fresh venv and
used there from outside the source tree: every public op against the reference, a few training
steps of the tiny preset, export, and generation. The long steps run once (module fixture)."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = torch.__version__.split("+")[0]  # the public version: what the wheel pins


def _run(cmd, timeout, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    assert shutil.which("git"), "git is needed: the wheel is built from a clone of this repository"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # a clone of this checkout's HEAD (a worktree's too), without the build folders or uncommitted files
    head = _run(["git", "-C", ROOT, "rev-parse", "HEAD"], 60).stdout.strip()
    _run(["git", "clone", "-q", "--no-checkout", ROOT, str(src)], 300)
    _run(["git", "-C", str(src), "checkout", "-q", head], 300)
    build = _run(["bash", "scripts/build_wheel.sh"], 1800, cwd=src, env={**os.environ, "PYTHON": sys.executable})
    (whl,) = (src / "wheelhouse").glob("*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    py = str(venv / "bin" / "python")
    # the wheel and its dependencies only (torch==TORCH, numpy, pyyaml), resolved from its metadata
    _run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(whl)], 900)
    work = tmp / "work"  # the working directory: outside the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPTK_") and k not in (
        "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return types.SimpleNamespace(path=whl, build_log=build.stdout, venv=venv, py=py, work=work, env=env)


def _in_venv(w, *args, timeout=600):
    return _run([w.py, *args], timeout, cwd=w.work, env=w.env)


def test_wheel_is_manylinux_with_torch_pinned_and_torch_libraries_not_grafted(wheel):
    assert re.search(r"-manylinux_2_\d+_x86_64\.whl$", wheel.path.name), wheel.path.name
    show = _run([sys.executable, "-m", "auditwheel", "show", str(wheel.path)], 300).stdout
    # its symbol versions allow a manylinux tag; the overall tag stays linux_x86_64 only because
    # _C links torch's libraries, which torch's wheel provides
    assert re.search(r'constrains the platform tag to\s+"manylinux_2_\d+_x86_64"', show), show
    assert "[build_wheel] auditwheel show: the symbol versions constrain the tag to" in wheel.build_log
    with zipfile.ZipFile(wheel.path) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not [n for n in names if ".libs/" in n], "auditwheel grafted libraries into the wheel"
    assert {f"mptkernels/configs/{p}.yaml" for p in ("tiny", "125m", "1b")} <= set(names)
    requires = re.findall(r"^Requires-Dist: ([^;\n]+)$", meta, re.M)
    assert f"torch=={TORCH}" in requires and {"numpy", "pyyaml"} <= set(requires), requires


def test_installed_wheel_runs_every_op_against_the_reference(wheel):
    shutil.copy(os.path.join(ROOT, "tests", "every_op.py"), wheel.work)
    out = json.loads(_in_venv(wheel, "every_op.py").stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(wheel.venv)), out["file"]  # the installed package, not the repo
    assert out["torch"].split("+")[0] == TORCH
    import mptkernels.ops
    from mptkernels import _loader

    # the wheel carries every CPU ISA level and runs this CPU's own
    assert out["cpu_isa"] == _loader.cpu_isa_supported()
    levels = _in_venv(wheel, "-c", "import mptkernels; print(','.join(mptkernels.build_info.cpu_isa_levels))")
    assert levels.stdout.split() == [",".join(mptkernels.build_info.cpu_isa_levels)]

    assert out["checked"] == sorted(mptkernels.ops.__all__)


def test_installed_wheel_trains_the_tiny_preset_exports_and_generates(wheel):
    txt = wheel.work / "txt"
    txt.mkdir()
    (txt / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    _in_venv(wheel, "-m", "mptkernels.data", "prepare", "--out", "data", "txt")
    args = ["-m", "mptkernels.train", "tiny", "data.path=data", "checkpoint.dir=run", "train.device=cpu"]
    _in_venv(wheel, *args, "train.steps=3", "train.warmup_steps=1")
    with open(wheel.work / "run" / "log.jsonl") as fh:
        steps = [rec for rec in map(json.loads, fh) if "loss" in rec and "event" not in rec]
    assert [rec["step"] for rec in steps] == [1, 2, 3] and all(math.isfinite(rec["loss"]) for rec in steps), steps
    _in_venv(wheel, *args, "--export", "hf")
    r = _in_venv(wheel, "-m", "mptkernels.generate", "--model", "hf", "--prompt", "the ", "--max-new-tokens", "4",
                 "--device", "cpu", "--int8")
    assert r.stdout.startswith("the ") and "[4 new tokens" in r.stderr, (r.stdout, r.stderr)


def test_installed_console_script_and_benchmarks(wheel):
    """The wheel's `mptkernels` script, and its benchmarks (mptkernels/bench ships in the wheel)."""
    script = str(wheel.venv / "bin" / "mptkernels")
    r = _run([script, "--help"], 300, cwd=wheel.work, env=wheel.env)
    assert r.stdout.startswith("usage: mptkernels ") and "bench" in r.stdout, r.stdout
    _run([script, "bench", "--size", "tiny", "--only", "rotary", "--no-plot", "--out", "bench"], 600, cwd=wheel.work,
         env=wheel.env)
    with open(wheel.work / "bench" / "results.json") as fh:
        rows = json.load(fh)["results"]
    assert {r["family"] for r in rows} == {"rotary"} and all(r["ms_min"] <= r["ms_median"] for r in rows)
