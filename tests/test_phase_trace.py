"""The phase-trace reduction (torch_swiftep/bench/phase_trace.py) on hand-made rings."""
import torch

from torch_swiftep import plan
from torch_swiftep.bench import phase_trace

POINTS = plan.TRACE_POINTS


def _ring(world, calls, start_ns, step_ns, skew_ns):
    """Rank r starts call j at start + j * step + r * skew; point p follows 100 ns later each.
    The ring stores call j at row (j + 5) % TRACE_CALLS, as the kernels do by epoch."""
    ring = torch.zeros(world, plan.TRACE_CALLS, len(POINTS), dtype=torch.int64)
    for r in range(world):
        for j in range(calls):
            t = start_ns + j * step_ns + r * skew_ns
            row = (j + 5) % plan.TRACE_CALLS
            ring[r, row] = torch.tensor([t + 100 * p for p in range(len(POINTS))])
    return ring


def test_summary_orders_rows_and_measures_from_the_first_rank():
    ring = _ring(world=3, calls=12, start_ns=10_000, step_ns=20_000, skew_ns=1_000)
    s = phase_trace.summarize(ring)
    assert s["dispatch_start"] == (0.0, 2.0)  # latest rank starts 2 us after the first
    last = POINTS.index("combine_end")
    assert s["combine_end"] == (last * 0.1, 2.0 + last * 0.1)
    assert s["period"] == 20.0
    # combine_end of call j on a rank to its dispatch_start of call j + 1
    assert abs(s["gap"] - (20.0 - last * 0.1)) < 1e-9
    assert s["per_rank"]["dispatch_start"] == [0.0, 1.0, 2.0]
    text = phase_trace.format_summary("t", s)
    assert "dispatch_counted" in text and "rank 2" in text


def test_unstamped_points_and_rings_are_left_out():
    ring = _ring(world=2, calls=4, start_ns=5_000, step_ns=9_000, skew_ns=0)
    ring[:, :, POINTS.index("combine_arrived")] = 0
    s = phase_trace.summarize(ring)
    assert "combine_arrived" not in s and "combine_released" in s
    assert phase_trace.summarize(torch.zeros_like(ring)) == {}
