"""Renders docs/ops.md from the contracts in ops/ (`python -m torch_swiftep.docgen`)."""
from __future__ import annotations

import pathlib
import sys

from .ops import CONTRACTS, NAMESPACE

DOC_PATH = pathlib.Path(__file__).resolve().parent.parent / "docs" / "ops.md"


def render() -> str:
    parts = [
        "# torch.ops.swiftep reference",
        "",
        "Generated from `ops/` by `python -m torch_swiftep.docgen`; do not edit by hand.",
        "Users normally call these through `torch_swiftep.Communicator`, which owns the",
        "workspace, peer table and plan arguments.",
        "",
    ]
    for c in CONTRACTS:
        parts += [f"## `{NAMESPACE}::{c.name}`", "", "```", f"{NAMESPACE}::{c.schema}", "```",
                  "", c.doc.strip(), ""]
    return "\n".join(parts)


def main() -> None:
    text = render()
    if "--check" in sys.argv:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            sys.exit(f"{DOC_PATH} is stale: run python -m torch_swiftep.docgen")
        return
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")


if __name__ == "__main__":
    main()
