"""A BatchPlan as plain data, to send to workers in other processes: the engine's plan is a view
of its own buffers (valid during Executor.execute only), so each step copies its fields into a
dict of numpy arrays and scalars, pickled once for all workers. ``PlanView`` gives a worker the
plan's attribute names back, which is all the executors' code reads."""

from __future__ import annotations

import functools

import numpy as np

from fastllm import _C


@functools.cache
def plan_fields() -> tuple[str, ...]:
    """Every field the BatchPlan binding exposes (new fields travel without a change here)."""
    return tuple(n for n in dir(_C.BatchPlan)
                 if not n.startswith("_") and isinstance(getattr(_C.BatchPlan, n), property))


def snapshot(plan) -> dict:
    """The plan's fields, copied out of the engine's buffers."""
    out = {}
    for name in plan_fields():
        value = getattr(plan, name)
        out[name] = np.array(value) if isinstance(value, np.ndarray) else value
    return out


class PlanView:
    """A snapshot read as a plan (attribute access)."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)
