"""swiglu_rows: the SwiGLU over the rows a window holds (torch_swiftep/activations.py).

CPU: the contract's semantics (rows past row_ends[-1] zero, the count clamped to the rows) and
its argument errors. CUDA (skipped without a GPU and the extension): bit for bit against
`F.silu(gate) * up` on the computed rows for every dtype, vectorized and element-wise widths,
and the rows past the count left untouched."""
import pytest
import torch
import torch.nn.functional as F

import torch_swiftep as ts


def _reference(gate_up, rows):
    width = gate_up.size(1) // 2
    return F.silu(gate_up[:rows, :width]) * gate_up[:rows, width:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ends", [[0], [5, 9], [3, 3, 17], [40]])
def test_cpu_rows_and_zeros(dtype, ends):
    gate_up = torch.randn(17, 2 * 12).to(dtype)
    out = ts.swiglu_rows(gate_up, torch.tensor(ends, dtype=torch.int32))
    rows = min(ends[-1], 17)
    assert out.shape == (17, 12) and out.dtype == dtype
    assert torch.equal(out[:rows], _reference(gate_up, rows))
    assert not out[rows:].any()


@pytest.mark.parametrize("gate_up, row_ends, error, text", [
    (torch.randn(4, 5), torch.tensor([2], dtype=torch.int32), ValueError, "columns"),
    (torch.randn(4, 6).long(), torch.tensor([2], dtype=torch.int32), TypeError, "gate_up"),
    (torch.randn(4, 6), torch.tensor([2]), TypeError, "row_ends"),
    (torch.randn(4, 6), torch.zeros(0, dtype=torch.int32), ValueError, "row_ends is empty"),
    (torch.randn(4, 6)[:, :4], torch.tensor([2], dtype=torch.int32), ValueError, "contiguous"),
    (torch.randn(6), torch.tensor([2], dtype=torch.int32), ValueError, "gate_up must have 2"),
])
def test_bad_arguments_are_named(gate_up, row_ends, error, text):
    with pytest.raises(error, match=text):
        ts.swiglu_rows(gate_up, row_ends)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or ts.CUDA_EXTENSION_ERROR is not None,
    reason="needs a GPU and the compiled extension")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [2048, 13, 1536])  # vectorized, element-wise, another
def test_cuda_bit_for_bit(dtype, width):
    gen = torch.Generator(device="cuda").manual_seed(width)
    rows = 3001
    gate_up = (torch.randn(rows, 2 * width, device="cuda", generator=gen) * 4).to(dtype)
    for count in (0, 1, 1777, rows, rows + 50):
        ends = torch.tensor([count // 3, count], dtype=torch.int32, device="cuda")
        out = ts.swiglu_rows(gate_up, ends)
        valid = min(count, rows)
        assert torch.equal(out[:valid], _reference(gate_up, valid)), (dtype, width, count)


@needs_cuda
def test_cuda_leaves_rows_past_the_count_alone_and_captures():
    gate_up = torch.randn(512, 256, device="cuda").bfloat16()
    ends = torch.tensor([100], dtype=torch.int32, device="cuda")
    torch.ops.swiftep.swiglu_rows(gate_up, ends)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.swiftep.swiglu_rows(gate_up, ends)
    out.fill_(7)
    for count in (100, 300, 0):  # the count is read on the device at replay
        ends.fill_(count)
        out.fill_(7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:count], _reference(gate_up, count))
        assert bool((out[count:] == 7).all())
