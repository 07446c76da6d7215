"""Files generated from a single source stay in sync with it, and the contracts stay a leaf."""
import ast
import pathlib
import sys

from torch_swiftep import codegen, plan
from torch_swiftep.ops import protocol

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_files_are_current():
    stale = [str(p.relative_to(ROOT)) for p in codegen.stale_files()]
    assert not stale, f"{stale} stale: run python3 -m torch_swiftep.codegen"


def test_plan_fields_unique_and_offsets_aligned():
    assert len(set(protocol.PLAN_FIELDS)) == len(protocol.PLAN_FIELDS)
    cfg = plan.CommConfig(num_experts=24, hidden=7168, num_topk=8, max_tokens_per_rank=33,
                          ll_max_tokens_per_rank=5)
    p = plan.Plan.build(cfg, rank=1, world_size=3)
    values = dict(zip(protocol.PLAN_FIELDS, p.as_list()))
    for name, value in values.items():
        if name.startswith("off_ctrl_"):
            assert value % protocol.CTRL_ALIGN == 0, name
        elif name.startswith("off_"):
            assert value % protocol.REGION_ALIGN == 0, name
            assert value < values["workspace_bytes"], name
    regions = [values[f"off_{r}"] for r in protocol.REGIONS] + [values["off_ctrl"]]
    assert regions == sorted(regions), "regions are laid out in protocol.REGIONS order"
    # dispatch_fanout's region: a u64 per (source rank, token), only when it is on
    assert values["dispatch_fanout"] == 0 and values["off_fanout_rows"] == values["off_combine_x"]
    on = dict(zip(protocol.PLAN_FIELDS, plan.Plan.build(
        plan.CommConfig(**{**cfg.__dict__, "dispatch_fanout": True}), 1, 3).as_list()))
    assert on["dispatch_fanout"] == 1
    assert on["off_combine_x"] - on["off_fanout_rows"] >= 3 * 33 * 8


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file; level > 0 for relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_contracts_are_a_leaf():
    """ops/ imports torch, the standard library and itself, never torch_swiftep."""
    allowed = {"torch", "__future__", "dataclasses", "struct", "typing"}
    for path in sorted((ROOT / "ops").glob("*.py")):
        for level, module in _imports(path):
            if level == 0:
                assert module.split(".")[0] in allowed, f"ops/{path.name} imports {module}"


def test_each_contract_module_is_loaded_once():
    import torch_swiftep  # noqa: F401

    top_level = [name for name in sys.modules if name == "ops" or name.startswith("ops.")]
    assert not top_level, f"contracts loaded a second time as {top_level}"
    from torch_swiftep import ops

    assert ops.protocol is protocol
    assert pathlib.Path(ops.__file__).resolve().parent == ROOT / "ops"
