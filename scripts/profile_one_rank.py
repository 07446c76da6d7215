"""Dispatch + combine on a world of ONE rank (no peer to wait for), for ncu, which serializes
kernels and so cannot profile several ranks that spin on each other. Same kernels, same shapes
as one rank of the standard prefill benchmark (4096 tokens, H 7168, top-8, 256 experts).

  ncu --clock-control none -k regex:combine_kernel -c 1 --section SpeedOfLight \
      --section WarpStateStats python3 scripts/profile_one_rank.py
"""
import torch

import torch_swiftep as ts
from torch_swiftep import testing

inp = testing.world_inputs(0, [4096], 7168, 256, 8, torch.bfloat16)
comm = ts.Communicator(None, ts.CommConfig(num_experts=256, hidden=7168, num_topk=8,
                                           max_tokens_per_rank=4096, capacity=4096 * 8,
                                           num_sms=4), device="cuda")
x, idx, w = (t.cuda() for t in (inp.xs[0], inp.topk_idx[0], inp.topk_weights[0]))
comm.combine_buffer().normal_()
for _ in range(3):
    handle = comm.dispatch(x, idx, w)
    y = comm.combine(comm.combine_buffer(), handle)
comm.check()
print("ok", y.shape)
