"""`dreamshot plan`: an analytic model of parameters, tokens, FLOPs and per-GPU memory of a training step.

`shape.py` reads the model's structure (exact parameter counts, the linears of one block) from the real
classes built on the meta device; `workload.py` describes a sample and the parallel setup; `flops.py` and
`memory.py` are pure functions of those, gathered per curriculum phase by `plan.py`; `report.py` prints
them. A benchmark that measures a real step can compare its numbers with `training_flops` /
`state_memory` / `activation_memory` directly.
"""
