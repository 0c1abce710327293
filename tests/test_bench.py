"""The benchmark harness (mptkernels/bench): the table's JSON carries a median and a spread for
every row and no %ceil above 100, the noisy flag and the goals follow from the samples, the
table's columns line up, bad arguments are one-line errors, and the same cases run under
pytest-benchmark (save, then compare)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mptkernels.bench import goals, harness, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(*args, cwd=ROOT, timeout=900):
    # the benchmarks as a user runs them: not under the Triton interpreter this suite sets up
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """benchmarks/run.py at the tiny size, every family: the quick run's code at test speed."""
    out = tmp_path_factory.mktemp("bench")
    p = _py("benchmarks/run.py", "--size", "tiny", "--device", "cpu", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "results.json") as f:
        return p.stdout, json.load(f), out


def test_every_row_has_median_and_spread(tiny_run):
    _, res, _ = tiny_run
    env, rows = res["environment"], res["results"]
    assert env["repeats"] == harness.TIMING["tiny"].repeats and env["size"] == "tiny"
    assert 0 <= env["cores_busy_before"] <= os.cpu_count() + 0.1
    assert {r["family"] for r in rows} == set(run.FAMILIES)
    for r in rows:
        assert len(r["samples_ms"]) == r["repeats"] == env["repeats"], r
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"], r
        assert r["ms_min"] == min(r["samples_ms"]) and r["ms_max"] == max(r["samples_ms"]), r
        assert r["rate"] > 0 and r["ceiling"] > 0 and r["ceiling_kind"], r
        if r["role"] == "ours":
            assert r["best_baseline"] and r["speedup_min"] <= r["speedup"] <= r["speedup_max"], r
            spread = (r["speedup_max"] - r["speedup_min"]) / r["speedup"]
        else:
            assert r["speedup"] is None, r
            spread = (r["ms_max"] - r["ms_min"]) / r["ms_median"]
        assert r["noisy"] == (spread > env["noisy_above"]), r


def test_no_ceiling_fraction_above_one(tiny_run):
    _, res, _ = tiny_run
    rows = res["results"]
    for r in rows:
        frac = r["rate"] / r["ceiling"]
        if frac <= 1:
            assert r["ceiling_frac"] == pytest.approx(frac) and r["ceiling_note"] is None, r
        else:  # impossible by definition: shown empty, with the reason
            assert r["ceiling_frac"] is None and "not shown" in r["ceiling_note"], r
    # the ceilings are real: most rows sit under them
    assert sum(r["ceiling_frac"] is not None for r in rows) >= len(rows) // 2


def test_table_blocks_per_case_and_plot(tiny_run):
    out, res, folder = tiny_run
    for r in res["results"]:
        assert f"{r['family']}: {r['case']}" in out
    assert "noisy:" in out and "vs best PyTorch" in out
    from PIL import Image  # matplotlib's own dependency

    with Image.open(folder / "benchmarks.png") as im:
        w, h = im.size
    assert 900 <= w <= 2000 and h >= 600, (w, h)


def _row(impl, role, samples, case="c", family="f", unit="GB/s", rate=1.0):
    med = sorted(samples)[len(samples) // 2]
    return harness.Row(family, case, impl, role, med, min(samples), max(samples), len(samples), rate, unit, 2.0,
                       "copy of the same bytes", rate / 2.0, samples_ms=list(samples))


def test_format_table_columns_line_up_with_long_names():
    rows = [_row("eager", "baselines", [1.0, 1.1, 1.2]),
            _row("quantize_rowwise + torch._int_mm + scales and something longer", "baselines", [2.0, 2.0, 2.1]),
            _row("mptkernels (cpu)", "ours", [0.5, 0.5, 0.6])]
    rows[2].speedup, rows[2].speedup_min, rows[2].speedup_max, rows[2].best_baseline = 2.0, 1.8, 2.2, "eager"
    env = {"device": "x", "cpu_threads": 2, "torch": "t", "triton": None, "date": "d", "repeats": 3}
    lines = harness.format_table(rows, env).splitlines()
    block = [l for l in lines if l.startswith("  ")]
    assert len(block) == 4  # head + 3 rows
    # the median column ends at the same place on every line
    ends = {l.index(f"{r.ms_median:.3f}") + len(f"{r.ms_median:.3f}") for l, r in zip(block[1:], rows)}
    assert ends == {block[0].index("median ms") + len("median ms")}
    assert "2.00× [1.80–2.20] vs eager" in block[3]
    assert "WARNING" not in "\n".join(lines)
    busy = harness.format_table(rows, {**env, "cores_busy_before": 1.5})
    assert "WARNING: other processes kept 1.5 cores busy as this run started" in busy


def test_others_busy_sees_another_process():
    """A process spinning on one core shows up as about one busy core; our own sleeping does not."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.5)
        busy = harness.others_busy(1.0)
    finally:
        spin.kill()
    assert busy is not None and busy >= 0.6, busy


def test_time_case_pairs_rounds_and_flags_noise(monkeypatch):
    """time_case's ratio is taken per round; a spread ratio is flagged noisy, a tight one not; the
    ceiling is the best sample of its kernels, sampled in the same rounds, and a rate above it is
    not shown as a fraction."""
    samples = {}

    def fake(fns, *a, **k):  # ceiling kernels have tuple names ("ceiling", kind)
        return {n: list(samples["ceiling" if isinstance(n, tuple) else n.split()[0]]) for n in fns}
    monkeypatch.setattr(harness, "time_interleaved", fake)
    case = harness.Case("f", "c", lambda: {"ours": {"mine (x)": None}, "baselines": {"base": None}}, nbytes=4e6)
    samples.update(base=[1.0, 1.0, 1.0], mine=[0.5, 0.5, 0.5], ceiling=[0.1, 0.05, 0.2])
    rows = {r.impl: r for r in harness.time_case(case, "cpu", "tiny")}
    r = rows["mine (x)"]
    assert r.speedup == 2.0 and not r.noisy and r.ceiling == pytest.approx(4e-3 / 0.05e-3)  # 4 MB in 0.05 ms
    assert r.ceiling_frac == pytest.approx(r.rate / r.ceiling) and r.ceiling_frac < 1
    samples.update(mine=[0.5, 1.0, 0.25])
    r = {r.impl: r for r in harness.time_case(case, "cpu", "tiny")}["mine (x)"]
    assert (r.speedup, r.speedup_min, r.speedup_max, r.noisy) == (2.0, 1.0, 4.0, True)
    samples.update(ceiling=[5.0, 5.0, 5.0])  # a ceiling slower than the case: impossible, not shown
    r = {r.impl: r for r in harness.time_case(case, "cpu", "tiny")}["mine (x)"]
    assert r.ceiling_frac is None and "not shown" in r.ceiling_note
    # a reference doing other work (attention without the case's window) gets its own rate
    case = harness.Case("f", "c", lambda: {"ours": {"mine (x)": None}, "baselines": {"base": None},
                                           "references": {"other": None}}, nbytes=4e6, work_of={"other": 8e6})
    samples.update(other=[1.0, 1.0, 1.0], ceiling=[0.1, 0.1, 0.1])
    rows = {r.impl: r for r in harness.time_case(case, "cpu", "tiny")}
    assert rows["other (not ranked)"].rate == pytest.approx(8.0) and rows["base"].rate == pytest.approx(4.0)


def test_goals_met_not_met_and_straddling():
    g = goals.Goal("cpu", "f", "c", 1.5, "eager")
    base = _row("eager", "baselines", [3.0, 3.0, 3.0])
    for samples, verdict in (([1.0, 1.0, 1.0], "met"), ([2.5, 2.5, 2.5], "not met"),
                             ([1.0, 1.9, 2.5], "met (the samples straddle the target: noisy)")):
        res = goals.evaluate(g, [base, _row("mptkernels (cpu)", "ours", samples)])
        assert res["verdict"] == verdict, (samples, res)
    rate_goal = goals.Goal("cpu", "f", "c", 3.0, None, unit="GB/s")
    res = goals.evaluate(rate_goal, [_row("mptkernels (cpu)", "ours", [1.0, 2.0, 4.0], rate=2.0)])
    assert (res["median"], res["min"], res["max"], res["unit"]) == (2.0, 1.0, 4.0, "GB/s")
    assert res["verdict"] == "not met (the samples straddle the target: noisy)"
    assert goals.evaluate(g, [])["verdict"].startswith("not measured")


def test_every_goal_names_a_case_that_runs():
    """A goal whose case name drifted from the family's would never be measured."""
    for dev in ("cpu", "cuda"):  # Cases allocate nothing until timed: the GPU's list here too
        names = [(c.family, c.name) for c in run.all_cases(dev, "full")]
        for g in goals.for_device(dev):
            assert any(goals.matches(g, f, n) for f, n in names), g


def test_goals_mode_prints_each_goal(tmp_path):
    p = _py("benchmarks/run.py", "--goals", "--only", "layer_norm", "--device", "cpu", "--no-plot", "--out",
            str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    section = p.stdout.split("goals on cpu:")[1]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert len(res["goals"]) == 2  # the two add+LayerNorm goals; the rest are other families
    for g in res["goals"]:
        assert g["verdict"].startswith(("met", "not met")) and g["goal"] in section
        assert g["min"] <= g["median"] <= g["max"] and g["unit"] == "×"


@pytest.mark.parametrize("args, needle", [
    (["--only", "layernorm"], "--only: expected a comma-separated list of layer_norm, rotary, attention, gemm, "
                              "glu, cross_entropy, got 'layernorm'"),
    (["--size", "huge"], "--size: invalid choice: 'huge'"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device: cuda was asked for")]))
def test_bad_arguments_are_one_line_errors(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run.main([*args, "--out", str(tmp_path)], prog="mptkernels bench")
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err, err
    assert [l for l in err.splitlines() if "error:" in l] == [err.splitlines()[-1]], err
    assert err.splitlines()[-1].startswith("mptkernels bench: error: ")


def test_pytest_benchmark_save_and_compare(tmp_path):
    """pytest benchmarks/ --benchmark-only: one test per implementation, grouped by case; a saved
    run compares with the next."""
    common = ["-m", "pytest", "benchmarks", "--benchmark-only", "--bench-size", "tiny", "--bench-device", "cpu",
              "-k", "rotary", "-q", "-p", "no:cacheprovider", "--benchmark-max-time", "0.02",
              "--benchmark-min-rounds", "3", "--benchmark-storage", str(tmp_path / "store")]
    p = _py(*common, "--benchmark-autosave", "--benchmark-json", str(tmp_path / "a.json"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    with open(tmp_path / "a.json") as f:
        bench = json.load(f)["benchmarks"]
    impls = {b["name"].split("/")[-1].rstrip("]") for b in bench}
    assert impls == {"eager", "torch.compile", "mptkernels_(cpu)"}, impls
    assert {b["group"] for b in bench} == {"rotary: rotary q,k (1,64,4,32) float32"}
    assert all(b["stats"]["median"] > 0 and b["extra_info"]["family"] == "rotary" for b in bench)
    p = _py(*common, "--benchmark-compare")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "Comparing against benchmarks from" in p.stdout + p.stderr


def test_cuda_event_timer_adds_gpu_time_between_calls(monkeypatch):
    """The GPU timer of the pytest-benchmark cases, with a stand-in for CUDA events: the
    difference of two calls is the (simulated) GPU time between their events."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(ROOT, "benchmarks", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    clock = {"gpu_ms": 0.0}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
        def record(self):
            self.at = clock["gpu_ms"]
        def synchronize(self):
            pass
        def elapsed_time(self, other):
            return other.at - self.at
    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer = conftest.CudaEventTimer()
    t0 = timer()
    clock["gpu_ms"] += 2.5
    t1 = timer()
    clock["gpu_ms"] += 0.25
    t2 = timer()
    assert (t1 - t0, t2 - t1) == (pytest.approx(2.5e-3), pytest.approx(0.25e-3))


def test_hf_patch_benchmark_quick_runs_both_sides(tmp_path):
    """benchmarks/hf_patch.py (issue 19's model-level goals): one process per side, the decode
    tokens compared, each goal printed; a bad argument is a one-line error."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "hf_patch.py")
    proc = subprocess.run([sys.executable, script, "decode", "--quick", "--reps", "1"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same tokens: True" in proc.stdout and "goal tokens/s >= 3x:" in proc.stdout, proc.stdout
    assert "transformers" in proc.stdout and "patched" in proc.stdout
    bad = subprocess.run([sys.executable, script, "train", "--reps", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--reps and --steps must be >= 1, got 0 and 3" in bad.stderr


def test_checkpoint_benchmark_runs_on_the_tiny_config(tmp_path):
    """benchmarks/checkpoint.py at the tiny size, one repeat: the blocked and write times of both
    modes' two checkpoints in its JSON and table; a bad argument is a one-line error."""
    p = _py("benchmarks/checkpoint.py", "--config", "tiny", "--reps", "1", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "checkpoint_tiny.json") as f:
        table = json.load(f)["table"]
    for mode in ("sync", "async"):
        assert len(table[mode]["blocked_s"]) == len(table[mode]["write_s"]) == len(table[mode]["cost_s"]) * 2, table
        assert f"\n  {mode} " in p.stdout, p.stdout
    bad = _py("benchmarks/checkpoint.py", "--steps", "2", "--every", "4", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--steps > --every, got 3, 4 and 2" in bad.stderr, bad.stderr


def test_resume_benchmark_runs_on_the_tiny_config(tmp_path):
    """benchmarks/resume.py, tiny, one process, one restart: every part of the time to the first
    step measured (> 0) and adding up to at most the whole; positioning timed at every step."""
    p = _py("benchmarks/resume.py", "--config", "tiny", "--nproc", "1", "--reps", "1", "--steps", "1",
            "--out", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "resume.json") as f:
        out = json.load(f)
    row = out["results"]["tiny/1"]
    parts = [row[k]["median"] for k in ("startup_s", "load_s", "data_s", "step_s")]
    assert all(v > 0 for v in parts) and sum(parts) <= row["first_step_after_s"]["median"], row
    assert sorted(map(int, out["positioning_s"])) == [10, 10**3, 10**5, 10**6, 10**8]
    assert "tiny        1 " in p.stdout, p.stdout
    bad = _py("benchmarks/resume.py", "--reps", "0", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--reps, --steps and --nproc must be >= 1, got 0, 4, [1, 2]" in bad.stderr


def _llama_cpp_script(*args, block=False, timeout=600):
    """benchmarks/vs_llama_cpp.py in a subprocess; block=True hides llama-cpp-python (as where it is
    not installed: CI) whether or not it is here."""
    script = os.path.join(ROOT, "benchmarks", "vs_llama_cpp.py")
    code = ("import runpy, sys\n" + ("sys.modules['llama_cpp'] = None\n" if block else "") +
            f"sys.argv = [{script!r}, *sys.argv[1:]]\nrunpy.run_path({script!r}, run_name='__main__')")
    return _py("-c", code, *args, timeout=timeout)


def test_llama_cpp_baseline_skips_in_one_line_without_llama_cpp(tmp_path):
    """Issue 21's llama.cpp baseline is benchmark-only: without llama-cpp-python (or without
    llama.cpp's converter) it says how to install it in one line and exits 0; bad arguments are
    one-line errors."""
    p = _llama_cpp_script("--size", "tiny", block=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("\n") == 1 and "skipped: llama-cpp-python is not installed" in p.stdout, p.stdout
    assert "pip install gguf llama-cpp-python" in p.stdout
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        p = _llama_cpp_script("--size", "tiny", "--llama-cpp", "")  # no converter given: skipped too
        assert p.returncode == 0 and p.stdout.count("\n") == 1, p.stdout + p.stderr[-3000:]
        assert "skipped: llama.cpp's converter was not given" in p.stdout
    for args, needle in ((["--precisions", "f32,f16"],
                          "--precisions: expected a comma-separated list of f32, bf16, q8_0, got 'f32,f16'"),
                         (["--llama-cpp", str(tmp_path)], "--llama-cpp (or $LLAMA_CPP_DIR): expected a folder "
                          f"holding llama.cpp's convert_hf_to_gguf.py, got {str(tmp_path)!r}"),
                         (["--reps", "0"], "--reps and --threads must be >= 1, got 0 and 2")):
        bad = _llama_cpp_script(*args)
        assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith(needle), bad.stderr
        assert [l for l in bad.stderr.splitlines() if "error:" in l] == [bad.stderr.splitlines()[-1]], bad.stderr
