"""Scale-out: the model split over several workers (tensor and pipeline parallelism on
torch.distributed), run as local processes or Ray actors behind the engine's one Executor.

- ``parallel_state``: a rank's place in the tp x pp grid and the model slices it holds
- ``layers``: the tensor-parallel modules (row-parallel linear, vocab-parallel embedding, logits)
- ``plan``: a BatchPlan copied into plain data for the workers
- ``worker``: one rank: its model share, KV cache and step (pipeline micro-batches)
- ``mp_workers`` / ``ray_workers``: the worker group as local processes or Ray actors
- ``executor``: the engine's Executor over a worker group
- ``data_parallel``: several engine replicas behind one server
"""
