"""Makes the contracts in the top-level ops/ folder importable as torch_swiftep.ops.

An install maps ops/ to torch_swiftep.ops (setup.py's package_dir). When the package is
imported straight from a source checkout that pip did not install for this interpreter
(PYTHONPATH=., or a second Python on the machine), that mapping is missing; this mounts ops/
from beside the package instead.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

_NAME = "torch_swiftep.ops"


def mount_ops_contracts() -> None:
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is not None:
        return
    ops_dir = pathlib.Path(__file__).resolve().parent.parent / "ops"
    init = ops_dir / "__init__.py"
    if not init.exists():
        raise ImportError(f"{_NAME} is not installed and {init} does not exist: reinstall "
                          "torch_swiftep (pip install -e .)")
    spec = importlib.util.spec_from_file_location(_NAME, init,
                                                  submodule_search_locations=[str(ops_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
