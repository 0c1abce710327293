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


def test_speedup_summary_lists_rows_with_a_speedup():
    demo = _demo()
    rows = [types.SimpleNamespace(family="attention", case="fwd bf16", impl="mptkernels", speedup=1.8,
                                  best_baseline="torch.compile"),
            types.SimpleNamespace(family="attention", case="fwd bf16", impl="eager", speedup=None, best_baseline=None)]
    assert demo._speedup_summary(rows) == ["attention fwd bf16 (mptkernels): 1.80x vs torch.compile"]
    assert demo._speedup_summary(None) == []
