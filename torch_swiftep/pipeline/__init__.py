"""Fine-grained pipelining of the MoE layer (FinDEP): a cost model fitted from measured task
times, and a solver that picks the chunking, order and communication SM budget."""
from .cost_model import COMM_TASKS, COMPUTE_TASKS, TASKS, CostModel, Sample
from .schedule import ORDERS, Schedule, Task, equal_chunks, simulate, solve

__all__ = ["COMM_TASKS", "COMPUTE_TASKS", "ORDERS", "TASKS", "CostModel", "Sample", "Schedule",
           "Task", "equal_chunks", "simulate", "solve"]
