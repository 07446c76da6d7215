"""Files small enough to read in one sitting, functions short enough to hold in one's head.

Limits from CONTRIBUTING.md: no source file over MAX_FILE_LINES, no Python function over
MAX_FUNCTION_LINES. (CUDA kernels are held to the file limit; a kernel's main loop may be longer
than the function limit where splitting it would cost registers, with a comment saying so.)
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
SOURCE_DIRS = ("torch_swiftep", "ops", "csrc", "tests", "scripts", "examples")
SUFFIXES = {".py", ".cu", ".cuh", ".h", ".cpp", ".sh"}


def _files():
    seen = set()
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            real = path.resolve()  # torch_swiftep/ops links to ops/: count each file once
            if path.suffix in SUFFIXES and path.is_file() and real not in seen:
                seen.add(real)
                yield path


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_is_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by " \
                                    "what it does"


def test_python_functions_are_short():
    long = []
    for path in _files():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
