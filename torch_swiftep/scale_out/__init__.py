"""Dispatch and combine across nodes (docs/design.md, "Scale-out"): the hierarchical throughput
schedule (hierarchical.py) over a put-with-signal transport (transport.py): NVSHMEM on GPUs,
threads of one process in the CPU tests."""
import torch

from .geometry import SIGNALS, Geometry
from .hierarchical import HierarchicalSchedule, Route
from .low_latency import LowLatencyRoute, LowLatencySchedule
from .rank import ScaleOutRank
from .transport import CHANNELS, NvshmemTransport, Region, ThreadWorld


def start_nvshmem(group, config, rank: int, world: int, capacity: int,
                  about_rank=None) -> ScaleOutRank:
    """Collective over `group`: NVSHMEM (once per process), this rank's symmetric buffers, and
    the schedule over them."""
    from ..nvshmem_engine import NvshmemEngine

    geometry = Geometry(config, rank, world, capacity)
    engine = NvshmemEngine.start(group)
    transport = NvshmemTransport(engine, group, geometry.buffer_bytes(), SIGNALS,
                                 geometry.P, config.timeout_s)
    return ScaleOutRank(HierarchicalSchedule(geometry, transport, about_rank),
                        LowLatencySchedule(geometry, transport, torch.device("cuda")))


__all__ = ["CHANNELS", "SIGNALS", "Geometry", "HierarchicalSchedule", "LowLatencyRoute",
           "LowLatencySchedule", "NvshmemTransport",
           "Region", "Route", "ScaleOutRank", "ThreadWorld", "start_nvshmem"]
