"""The local CPU backend: a verl platform for CPU-only machines and the `hf` rollout server.

Everything here is registered through verl's own extension points (see :mod:`l2t_verl.plugin`),
so the stock verl trainer runs on a laptop or a CI box without a GPU.
"""
