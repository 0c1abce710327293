"""The command line: ``mptkernels`` / ``python -m mptkernels`` and its subcommands (help, usage
names, errors, the console script), and ``mptkernels.info()`` printing its report exactly once."""
import io
import os
import subprocess
import sys

import pytest

import mptkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, code=None):
    """A child Python in the repository root (the checkout's mptkernels), output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _report_count(text):
    """How many times the info() report is in text (its first line, and a line only it has)."""
    lines = text.splitlines()
    heads, isa = lines.count("mptkernels.info()"), sum(x.startswith("  CPU kernels ISA: ") for x in lines)
    assert heads == isa, text
    return heads


# ------------------------------------------------------------------ info()
def test_info_in_a_script_prints_the_report_once():
    r = _python(code="import mptkernels; mptkernels.info()")
    assert r.returncode == 0 and _report_count(r.stdout) == 1, r.stdout + r.stderr


def test_print_of_info_prints_the_report_once_then_one_short_line():
    r = _python(code="import mptkernels; print(mptkernels.info())")
    assert r.returncode == 0 and _report_count(r.stdout) == 1, r.stdout + r.stderr
    last = r.stdout.splitlines()[-1]
    assert last.startswith("<mptkernels.info() facts: a dict of ") and last.endswith(", ...)>"), last


def test_info_at_the_repl_shows_the_report_once(capsys):
    sys.displayhook(mptkernels.info())  # what the REPL does with a bare `mptkernels.info()`
    out = capsys.readouterr().out
    assert _report_count(out) == 1, out
    assert out.splitlines()[-1].startswith("<mptkernels.info() facts: a dict of "), out


def test_info_facts_are_a_dict_and_file_takes_the_report(capsys):
    buf = io.StringIO()
    facts = mptkernels.info(file=buf)
    assert capsys.readouterr().out == ""  # the report went to file only
    assert _report_count(buf.getvalue()) == 1
    assert isinstance(facts, dict) and facts["CPU kernels ISA"] == mptkernels.cpu_isa()
    assert facts["mptkernels"] == mptkernels.__version__ and "ops" in facts
    assert repr(dict(facts)).startswith("{'mptkernels': ")  # the full dict, when asked for
    assert str(facts) == repr(facts) and len(repr(facts)) < 100  # one short line, not the report nor every fact
