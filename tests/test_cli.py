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


# ------------------------------------------------------------------ the mptkernels command
from mptkernels.__main__ import COMMANDS, main  # noqa: E402

# what each command's --help must show beyond its usage line (its own options, not only the name)
OWN_OPTION = {"info": "what auto chooses", "data": "{prepare}", "train": "--export DIR", "generate": "--prompt"}


def test_module_form_help_lists_every_command():
    r = _python("-m", "mptkernels", "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("usage: python -m mptkernels [-h] [--version] COMMAND [ARGS ...]\n"), r.stdout
    lines = r.stdout.splitlines()
    for name, (_, help_) in COMMANDS.items():  # bench too: its module lands separately
        assert any(x.split() == [name, *help_.split()] for x in lines), (name, r.stdout)
    assert "python -m mptkernels train tiny --export runs/tiny/hf" in r.stdout  # the first run, in the name typed


def test_module_form_runs_the_subcommand_under_its_typed_name():
    r = _python("-m", "mptkernels", "train", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m mptkernels train "), r.stdout
    assert "--export DIR" in r.stdout


@pytest.mark.parametrize("name", sorted(OWN_OPTION))
def test_each_command_help_is_its_modules_under_the_command_name(name, capsys):
    assert set(OWN_OPTION) == set(COMMANDS) - {"bench"}
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])  # prog: the console script's name
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: mptkernels {name} "), out
    assert OWN_OPTION[name] in out, out


def test_data_prepare_help_names_the_whole_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: mptkernels data prepare ")


def test_the_console_script_is_declared_and_runs_main():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    assert scripts == {"mptkernels": "mptkernels.__main__:main"}
    # what the generated script does: sys.exit(main()) with the user's arguments in sys.argv
    r = _python("generate", "--help", code="import sys; from mptkernels.__main__ import main; sys.exit(main())")
    assert r.returncode == 0 and r.stdout.startswith("usage: mptkernels generate "), r.stdout + r.stderr


def test_help_imports_no_command_module_nor_heavy_packages():
    code = """if True:
        import sys
        from mptkernels.__main__ import COMMANDS, main
        before = set(sys.modules)  # `import mptkernels`'s own (mptkernels._info: info() is public)
        try:
            main(["--help"])
        except SystemExit:
            pass
        print("loaded:", sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("transformers", "triton",
                                "matplotlib") or m.startswith("torch._dynamo") or m in dict(COMMANDS.values())))
        for name in ("info", "data", "train", "generate"):
            try:
                main([name, "--help"])
            except SystemExit:
                pass
        print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "triton", "matplotlib")
                                or m.startswith("torch._dynamo")))
    """
    r = _python(code=code)
    assert r.returncode == 0, r.stderr
    assert [x for x in r.stdout.splitlines() if x.startswith("loaded:")] == ["loaded: []"] * 2, r.stdout[-2000:]


def test_unknown_command_is_one_line_naming_it_exit_2():
    r = _python("-m", "mptkernels", "trian", "tiny")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("python -m mptkernels: error: unknown command 'trian'")
    assert "did you mean 'train'?" in r.stderr and "info, data, train, generate, bench" in r.stderr, r.stderr


@pytest.mark.parametrize("argv, message", [
    (["zzz"], "unknown command 'zzz' (commands: info, data, train, generate, bench)"),
    (["--bogus", "train"], "unrecognized arguments: --bogus"),
    (["--"], "no COMMAND given"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"mptkernels: error: {message}") and err.endswith("(see 'mptkernels --help')\n"), err


def test_no_command_prints_the_help_on_stderr_exit_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: mptkernels ") and "  generate " in err, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"mptkernels {mptkernels.__version__}\n"


def test_info_command_prints_the_report_once():
    r = _python("-m", "mptkernels", "info")
    assert r.returncode == 0 and _report_count(r.stdout) == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("  scaled_dot_product_attention falls back")  # no dict after it


def test_a_command_runs_its_modules_main_with_or_without_prog(monkeypatch, capsys):
    # how bench is run: a module imported by name when its command runs, whose main may not take prog
    import types

    calls = []
    plain, with_prog = types.ModuleType("fake_plain"), types.ModuleType("fake_prog")
    plain.main = lambda argv: calls.append(("plain", argv))  # returns None: exit status 0
    with_prog.main = lambda argv, prog="x": calls.append((prog, argv)) or 3
    monkeypatch.setitem(sys.modules, "fake_plain", plain)
    monkeypatch.setitem(sys.modules, "fake_prog", with_prog)
    monkeypatch.setitem(COMMANDS, "plain", ("fake_plain", "a command"))
    monkeypatch.setitem(COMMANDS, "withprog", ("fake_prog", "another"))
    monkeypatch.setitem(COMMANDS, "absent", ("mptkernels.no_such_module.run", "not installed"))
    assert main(["plain", "--quick", "x"]) == 0
    assert main(["withprog", "-v"]) == 3
    assert calls == [("plain", ["--quick", "x"]), ("mptkernels withprog", ["-v"])]
    assert main(["absent"]) == 1
    err = capsys.readouterr().err
    assert err == "mptkernels absent: error: not in this install (no module mptkernels.no_such_module.run)\n", err
