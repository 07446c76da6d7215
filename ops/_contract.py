"""What an op contract is: a name, a schema, a docstring and a fake (meta) kernel."""
from __future__ import annotations

import dataclasses
from typing import Callable

NAMESPACE = "swiftep"


@dataclasses.dataclass(frozen=True)
class OpContract:
    name: str
    schema: str  # the argument list and returns, as torch.library.define takes them
    doc: str  # shapes and dtypes of every tensor; rendered into docs/ops.md
    fake: Callable  # shape/dtype-only kernel for FakeTensor, torch.compile and opcheck

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def schema_one_line(self) -> str:
        return " ".join(self.schema.split()).replace("( ", "(").replace(" )", ")")
