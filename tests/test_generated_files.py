"""Files generated from a single source stay in sync with it."""
import pathlib

from torch_swiftep import docgen, plan

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_plan_header_is_current():
    header = ROOT / "csrc" / "include" / "swiftep" / "plan_fields.h"
    assert header.read_text() == plan.emit_header(), (
        "csrc/include/swiftep/plan_fields.h is stale: "
        "python -m torch_swiftep.plan --emit-header > csrc/include/swiftep/plan_fields.h")


def test_ops_doc_is_current():
    assert docgen.DOC_PATH.read_text() == docgen.render(), (
        "docs/ops.md is stale: python -m torch_swiftep.docgen")


def test_plan_fields_unique_and_offsets_aligned():
    assert len(set(plan.PLAN_FIELDS)) == len(plan.PLAN_FIELDS)
    cfg = plan.CommConfig(num_experts=24, hidden=7168, num_topk=8, max_tokens_per_rank=33,
                          ll_max_tokens_per_rank=5)
    p = plan.Plan.build(cfg, rank=1, world_size=3)
    values = dict(zip(plan.PLAN_FIELDS, p.as_list()))
    for name, value in values.items():
        if name.startswith("off_ctrl_"):
            assert value % 8 == 0, name
        elif name.startswith("off_"):
            assert value % plan.REGION_ALIGN == 0, name
            assert value < values["workspace_bytes"], name
