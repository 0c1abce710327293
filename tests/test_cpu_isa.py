"""The CPU kernels' ISA levels (csrc/cpu/isa.cpp): chosen at load from what the CPU runs, capped
by MPTK_CPU_ISA / mptkernels.cpu_isa(), every level correct, and no level's code able to run an
instruction the CPUs of a lower level lack.

The main suite runs the kernel tests at the level this CPU chooses; the lower levels rerun them
here, each in a subprocess with MPTK_CPU_ISA set. CPUs without AVX-512 or AVX2 are emulated by
qemu-user (TCG emulates up to AVX2, none of AVX-512), so a stray instruction would stop there.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

import mptkernels
from mptkernels import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = mptkernels.build_info.cpu_isa_levels  # lowest first
CPU_BEST = _loader.cpu_isa_supported()
# the test files of the C++ CPU kernels (the Triton tests there run under the interpreter and
# call none of them: left out)
KERNEL_TESTS = ["tests/test_layer_norm.py", "tests/test_rotary.py", "tests/test_attention.py", "tests/test_gemm.py",
                "tests/test_glu.py", "tests/test_cross_entropy.py"]
QEMU = shutil.which("qemu-x86_64")
X86 = "avx2" in LEVELS


@pytest.fixture
def restore_level():
    before = mptkernels.cpu_isa()
    yield
    mptkernels.cpu_isa(before)


def test_the_cpu_s_best_level_is_used_and_can_be_capped(restore_level):
    assert LEVELS[0] == "default" and CPU_BEST in LEVELS
    assert mptkernels.cpu_isa() == CPU_BEST  # the suite runs without MPTK_CPU_ISA
    for level in LEVELS[: LEVELS.index(CPU_BEST) + 1]:
        assert mptkernels.cpu_isa(level) == level
        x = torch.randn(3, 37, dtype=torch.bfloat16)  # the kernel of this level runs
        assert torch.allclose(mptkernels.ops.rms_norm(x, None).float(), mptkernels.reference.rms_norm(x, None).float(),
                              atol=2e-2)
    assert mptkernels.cpu_isa("auto") == CPU_BEST
    info = mptkernels.info(file=open(os.devnull, "w"))
    assert info["CPU kernels ISA"] == CPU_BEST and info["CPU ISA levels"]["built"] == LEVELS


def test_bad_levels_are_refused_with_the_valid_ones_named(restore_level):
    with pytest.raises(ValueError, match=r"cpu_isa: CPU ISA level must be one of auto, default.*; got 'avx9'"):
        mptkernels.cpu_isa("avx9")
    with pytest.raises(TypeError, match="cpu_isa: level must be a str"):
        mptkernels.cpu_isa(2)
    assert mptkernels.cpu_isa() == CPU_BEST  # unchanged
    env = {**os.environ, "MPTK_CPU_ISA": "sse9"}
    proc = subprocess.run([sys.executable, "-c", "import mptkernels"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert re.search(r"ValueError: MPTK_CPU_ISA='sse9': CPU ISA level must be one of auto, default", proc.stderr)


# the levels below this CPU's own (the main suite runs the kernel tests at its own level; the
# CPU cannot run those above it)
@pytest.mark.parametrize("level", LEVELS[: LEVELS.index(CPU_BEST)])
def test_kernel_tests_pass_at_each_lower_level(level):
    env = {**os.environ, "MPTK_CPU_ISA": level}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS,
                           "-k", "not triton", "-m", "not gpu"], cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert f"mptkernels CPU ISA level: {level}" in out, out[-3000:]  # conftest's report header
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", out) and " failed" not in out


@pytest.mark.parametrize("cpu, cap, level", [
    ("Haswell,-avx2,-fma", None, "default"),  # an AVX CPU without AVX2 (Sandy Bridge's kind)
    ("Haswell", None, "avx2"),
    ("Haswell", "avx512_bf16", "avx2"),  # a cap above the CPU is lowered, with a warning
])
def test_emulated_cpus_run_every_op_at_their_level(cpu, cap, level, tmp_path):
    if not X86:  # elsewhere only the default level is built: nothing to emulate
        assert LEVELS == ["default"]
        return
    assert QEMU, "qemu-x86_64 not found: scripts/test.sh installs qemu-user (Debian: apt-get install qemu-user)"
    env = {k: v for k, v in os.environ.items() if k != "MPTK_CPU_ISA"}
    if cap:
        env["MPTK_CPU_ISA"] = cap
    proc = subprocess.run([QEMU, "-cpu", cpu, sys.executable, os.path.join(ROOT, "tests", "every_op.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cpu_isa"] == level and result["checked"] == sorted(mptkernels.ops.__all__), result
    if cap:
        assert f"CPU ISA level '{cap}' asked for, but this CPU runs at most '{level}'" in proc.stderr


# instruction classes by what objdump prints: AVX-512 (EVEX: zmm, mask or upper 16 registers),
# its BF16 and VNNI instructions, and any VEX-encoded one (AVX/AVX2/FMA/F16C)
_BF16 = re.compile(r"\b(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)\b")
_VNNI = re.compile(r"\b(vpdpbusds?|vpdpwssds?)\b")
_EVEX = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
_ALLOWED = {"shared": set(), "DEFAULT": set(), "AVX2": {"avx"}, "AVX512": {"avx", "avx512"},
            "AVX512_BF16": {"avx", "avx512", "bf16", "vnni"}}
# a function's level: the namespace of ours or at::vec's its (demangled or mangled) name names
_LEVEL = re.compile(r"(?:mptk::cpu::|at::vec::)(DEFAULT|AVX2|AVX512_BF16|AVX512)::|(?:3cpu|3vec)\d+(DEFAULT|AVX2|AVX512_BF16|AVX512)")


def test_no_function_uses_instructions_above_its_level():
    """Every function of _C, by the level its name belongs to, uses only that level's
    instructions; the code outside the levels (isa.cpp, registration, the inline functions of
    torch's headers that several levels emit, linked from the lowest level first) none of the
    vector extensions. This is what keeps an AVX2 CPU from meeting an AVX-512 instruction."""
    if not X86:  # elsewhere only the default level is built
        assert LEVELS == ["default"]
        return
    so = _loader.library_path()  # objdump: binutils, which gcc's build of _C needed too
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                         check=True).stdout
    seen, bad, level, name = Counter(), Counter(), None, None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            levels = {a or b for a, b in _LEVEL.findall(name)}
            level = max(levels, key=list(_ALLOWED).index) if levels else "shared"
            # a local clone (.constprop, .isra) is called only from the file that made it
            if level == "shared" and "[clone ." in name:
                level = None
            continue
        if level is None or "\t" not in line:
            continue
        ins = line.split("\t", 1)[1]
        cls = ("bf16" if _BF16.search(ins) else "vnni" if _VNNI.search(ins) else "avx512" if _EVEX.search(ins)
               else "avx" if ins.lstrip().startswith("v") else None)
        if cls:
            seen[level, cls] += 1
            if cls not in _ALLOWED[level]:
                bad[level, cls, name[:200]] += 1
    assert not bad, bad.most_common(20)
    # the scan sees what it looks for: each level's own instructions are there
    assert seen["AVX2", "avx"] and seen["AVX512", "avx512"] and seen["AVX512_BF16", "bf16"] and seen["AVX512_BF16", "vnni"]
    assert not any(lv == "DEFAULT" for lv, _ in seen)
