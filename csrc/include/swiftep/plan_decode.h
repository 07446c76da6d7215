// Host helper: the CommParams of one call, from the op's `int[] plan` (no torch).
#pragma once

#include <cstdint>

#include "swiftep/params.h"
#include "swiftep/plan_fields.h"

namespace swiftep {

// plan: kPlanNumFields values (the caller checks the length). Pointers are device addresses.
inline CommParams decode_plan(const int64_t* plan, uint8_t* workspace, const int64_t* peer_ptrs) {
  CommParams c{};
  c.workspace = workspace;
  c.peer_ptrs = peer_ptrs;
  c.rank = static_cast<int32_t>(plan[kPlan_rank]);
  c.world_size = static_cast<int32_t>(plan[kPlan_world_size]);
  c.num_experts = static_cast<int32_t>(plan[kPlan_num_experts]);
  c.num_local_experts = c.world_size > 0 ? c.num_experts / c.world_size : 0;
  c.capacity = plan[kPlan_capacity];
  c.ll_rows_per_expert = plan[kPlan_world_size] * plan[kPlan_ll_max_tokens_per_rank];
  c.timeout_ms = plan[kPlan_timeout_ms];
  c.off_recv_x = plan[kPlan_off_recv_x];
  c.off_recv_scales = plan[kPlan_off_recv_scales];
  c.off_recv_src = plan[kPlan_off_recv_src];
  c.off_recv_weights = plan[kPlan_off_recv_weights];
  c.off_combine_x = plan[kPlan_off_combine_x];
  c.off_ll_recv_x = plan[kPlan_off_ll_recv_x];
  c.off_ll_recv_scales = plan[kPlan_off_ll_recv_scales];
  c.off_ll_recv_src = plan[kPlan_off_ll_recv_src];
  c.off_ll_recv_weights = plan[kPlan_off_ll_recv_weights];
  c.off_ll_combine_x = plan[kPlan_off_ll_combine_x];
  c.off_counts = plan[kPlan_off_ctrl_counts];
  c.off_count_flags = plan[kPlan_off_ctrl_count_flags];
  c.off_data_flags = plan[kPlan_off_ctrl_data_flags];
  c.off_combine_flags = plan[kPlan_off_ctrl_combine_flags];
  c.off_ll_counts = plan[kPlan_off_ctrl_ll_counts];
  c.off_ll_arrivals = plan[kPlan_off_ctrl_ll_arrivals];
  c.off_ll_expected = plan[kPlan_off_ctrl_ll_expected];
  c.off_ll_combine_flags = plan[kPlan_off_ctrl_ll_combine_flags];
  c.off_epoch = plan[kPlan_off_ctrl_epoch];
  c.off_blocks_done = plan[kPlan_off_ctrl_blocks_done];
  c.off_status = plan[kPlan_off_ctrl_status];
  c.off_host_status_ptr = plan[kPlan_off_ctrl_host_status_ptr];
  c.off_trace_on = plan[kPlan_off_ctrl_trace_on];
  c.off_trace = plan[kPlan_off_ctrl_trace];
  return c;
}

}  // namespace swiftep
