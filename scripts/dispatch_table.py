"""Print the op table of docs/architecture.md made from mptkernels._dispatch.TABLE, or (--write)
rewrite it there. tests/test_dispatch.py fails when the docs are out of date."""
import sys

from mptkernels import _dispatch

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        _dispatch.write_docs_table()
        print(f"wrote the dispatch table into {_dispatch._docs_path()}")
    else:
        print(_dispatch.markdown_table())
