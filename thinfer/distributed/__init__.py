"""Tensor parallelism: one engine over several processes (see docs/distributed.md).

Rank 0, the driver (`driver.DriverEngine`), is the engine users talk to: it schedules,
samples and makes the shared compression decisions. Every other rank runs a worker
(`worker.serve_commands`): the same engine over its own shard of the weights and KV cache,
stepping when the driver says so. Ranks are spawned by thinfer on one node
(`launch.start_tensor_parallel`) or started by torchrun across nodes.
"""
