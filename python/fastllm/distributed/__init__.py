"""Scale-out: the model split over several workers (tensor and pipeline parallelism on
torch.distributed), run as local processes or Ray actors behind the engine's one Executor.

- ``plan``: a BatchPlan copied into plain data for the workers
- ``worker``: one rank: its model share, KV cache and step (pipeline micro-batches)
- ``mp_workers`` / ``ray_workers``: the worker group as local processes or Ray actors
- ``executor``: the engine's Executor over a worker group
- ``procs``: connections between the engine's process and the processes it starts

A rank's place in the tp x pp grid and the tensor-parallel modules are model code
(``fastllm.models.parallel``); several engine replicas behind one server (data parallelism) are
a front end (``fastllm.engine.data_parallel``).
"""
