"""Formulations shared by the models' fast implementations: the same math as a plain PyTorch
call, cut into kernels that suit a device better (CPU products of one or a few rows, attention
with a relative-position bias written a tile of queries at a time). Models import these; no
model imports another."""
