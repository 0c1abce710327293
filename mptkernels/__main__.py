"""The ``mptkernels`` command (also ``python -m mptkernels``): one entry point for the package's
command-line tools. ``COMMANDS`` is the one list of subcommands; each runs the ``main(argv, prog)``
of its module with the arguments after its name (``mptkernels train tiny`` is
``python -m mptkernels.train tiny``), so a command's options and errors are its module's own.
A module is imported only when its command runs: ``mptkernels --help`` imports none of them."""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import sys

# name -> (module whose main(argv, prog=...) runs it, one line of help), in the order of a first run
COMMANDS = {
    "info": ("mptkernels._info", "what was built, and what each op runs on each device"),
    "data": ("mptkernels.data", "tokenise text files for training"),
    "train": ("mptkernels.train", "train an MPT model from a YAML config or a preset (FSDP, resumable)"),
    "generate": ("mptkernels.generate", "generate text with a trained or Hugging Face MPT model"),
    "bench": ("mptkernels.bench.run", "benchmark the ops against PyTorch's on this machine"),
}

_FIRST_RUN = """\
A first run (byte-level text, a tiny model; a minute or two on a 2-core CPU):
  %(prog)s data prepare README.md docs --out runs/data-bytes   # any text files or folders
  %(prog)s train tiny                                          # -> runs/tiny/ckpt-00000200
  %(prog)s train tiny --export runs/tiny/hf                    # a Hugging Face MPT directory
  %(prog)s generate --model runs/tiny/hf --prompt "The "

'%(prog)s COMMAND --help' shows a command's options."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, like the commands' own config errors (argparse's default adds the usage line)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    from . import __version__

    width = max(map(len, COMMANDS)) + 3
    commands = "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items())
    p = _Parser(prog=prog, usage="%(prog)s [-h] [--version] COMMAND [ARGS ...]",
                description="Fast kernels for MPT-style transformers as PyTorch custom ops,\n"
                            f"and the MPT model, training and generation that use them.\n\ncommands:\n{commands}",
                epilog=_FIRST_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mptkernels {__version__}")
    # optional here, so that a bad option before it is named (argparse would first say COMMAND is missing)
    p.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return p


def _run_module(module_name: str, argv: list, prog: str) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # the command's own module missing (not one of its dependencies: that traceback is the module's to explain)
        if e.name is None or not (module_name + ".").startswith(e.name + "."):
            raise
        print(f"{prog}: error: not in this install (no module {module_name})", file=sys.stderr)
        return 1
    main = module.main
    kwargs = {"prog": prog} if "prog" in inspect.signature(main).parameters else {}
    rc = main(argv, **kwargs)
    return rc if isinstance(rc, int) else 0  # generate's main returns the tokens, data's None


def main(argv=None, prog: str = "mptkernels") -> int:
    """Run ``prog COMMAND ARGS...``; returns the exit status. ``prog`` is the name the user typed
    (the console script: ``mptkernels``; ``python -m mptkernels``), shown in every usage line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser(prog)
    if not argv:  # as git does: the usage and the commands (on stderr, exit 2: nothing was run)
        p.print_help(sys.stderr)
        return 2
    # the top level's own arguments are the options before the command; the rest is the command's
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args, unknown = p.parse_known_args(argv[:i + 1])
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = args.command
    if command is None:  # `mptkernels --`
        p.error("no COMMAND given")
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        p.error(f"unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f" (commands: {', '.join(COMMANDS)})")
    return _run_module(COMMANDS[command][0], argv[i + 1:], f"{prog} {command}")


if __name__ == "__main__":
    sys.exit(main(prog="python -m mptkernels"))
