"""scripts/demo.py: the text it trains on, its train -> save -> from_hf -> generate path (a few
seconds of training) and the benchmark summary hook."""
import importlib.util
import json
import math
import os
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_is_standard_library_code_without_docstrings_or_comments():
    demo = _demo()
    src = ('"""Module doc."""\nimport os\n\n\n\nclass A:\n    """Class\n    doc."""\n    x = 1\n\n'
           'def f(x):\n    # a comment line\n    s = """not a docstring"""\n    return x  # kept\n')
    assert demo._code_only(src) == 'import os\n\nclass A:\n    x = 1\n\ndef f(x):\n    s = """not a docstring"""\n' \
                                   '    return x  # kept\n'
    data, n_files = demo._corpus(300_000)
    assert data.dtype == torch.int64 and data.numel() == 300_000 and n_files >= 2
    text = bytes(data.tolist()).decode("utf-8", errors="replace")
    lines = text.splitlines()
    assert sum(line.startswith(("def ", "    def ", "import ", "class ")) for line in lines) > 100
    assert not any(line.lstrip().startswith("#") for line in lines)


def test_train_save_load_generate(tmp_path, capsys):
    demo = _demo()
    got = demo.train_and_generate("cpu", str(tmp_path), seconds=2)
    out = capsys.readouterr().out
    assert got["steps"] >= 1 and got["tokens"] == got["steps"] * demo.SETTINGS["cpu"]["batch"] * demo.SETTINGS["cpu"]["seq"]
    assert all(math.isfinite(v) for v in got["loss"]) and got["loss"][1] < got["loss"][0]
    with open(os.path.join(got["path"], "config.json")) as f:
        assert json.load(f)["model_type"] == "mpt"
    assert os.path.exists(os.path.join(got["path"], "model.safetensors"))
    assert "loaded back with MPTForCausalLM.from_hf" in out and "greedy (temperature 0)" in out
    assert "sampled (temperature 0.8, top-k 20)" in out and got["tok_per_s"] > 0


def test_speedup_summary_one_line_per_case_from_the_bench_rows():
    """The demo's closing lines come from mptkernels.bench rows: per case what auto runs, its
    ratio's median [min-max], noisy cases marked and counted."""
    from mptkernels.bench.harness import Row

    demo = _demo()

    def row(case, impl, role, speedup=None, lo=None, hi=None, noisy=False):
        r = Row("attention", case, impl, role, 1.0, 1.0, 1.0, 3, 1.0, "GB/s", 2.0, "x", 0.5, noisy=noisy)
        if speedup:
            r.speedup, r.speedup_min, r.speedup_max, r.best_baseline = speedup, lo, hi, "SDPA"
        return r
    rows = [row("fwd", "SDPA", "baselines"), row("fwd", "mptkernels (triton)", "ours", 1.2, 1.1, 1.3),
            row("fwd", "mptkernels (auto)", "ours", 1.8, 1.7, 1.9),
            row("decode", "mptkernels (cpu)", "ours", 1.1, 0.7, 1.6, noisy=True)]
    lines = demo._speedup_summary(rows)
    assert lines[0].startswith("attention: fwd    ") and lines[0].endswith(" 1.80× [1.70–1.90] vs SDPA")
    assert lines[1].startswith("attention: decode ") and lines[1].endswith("(noisy)")
    assert lines[2] == ("faster than PyTorch's best path in every round: 1 of 2 cases; "
                        "noisy (rerun on a quiet machine): 1")
    assert demo._speedup_summary(None) == []
