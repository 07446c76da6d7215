"""What an op contract is: a name, a schema, a docstring, its checks and a fake (meta) kernel."""
from __future__ import annotations

import dataclasses
from typing import Callable

NAMESPACE = "swiftep"


@dataclasses.dataclass(frozen=True)
class OpContract:
    name: str
    schema: str  # the argument list and returns, as torch.library.define takes them
    doc: str  # shapes and dtypes of every tensor; rendered into docs/ops.md
    # check(*op_args): raises ValueError/TypeError naming the argument and the value when the
    # arguments break the schema's shape/dtype/device rules. Runs once, in the Python wrapper,
    # before the op (no device work, no sync); backends do not repeat it.
    check: Callable
    fake: Callable  # shape/dtype-only kernel for FakeTensor, torch.compile and opcheck

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def schema_one_line(self) -> str:
        return " ".join(self.schema.split()).replace("( ", "(").replace(" )", ")")
