"""A CUDA graph of one decode step (manual capture, static buffers).

Captured once per static KV cache, replayed for every later step of every request that
reuses that cache. Ranges opened inside a captured region fire at capture time only, so the
caller wraps each `replay()` in its stage range: all replayed kernels share the
`cudaGraphLaunch` correlation id and are credited to the range around the replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Eager runs on a side stream before capture: they create the library handles, workspaces
#: and cached kernels that must not be created during capture.
WARMUP_STEPS = 2


class DecodeGraph:
    """`step()` captured as a CUDA graph; `output` is the tensor it returned during capture,
    rewritten by every replay."""

    def __init__(self, step: Callable[[], torch.Tensor], device: torch.device):
        # On the model's GPU, whichever is current: streams, the capture and the memory pool.
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = step()
            # The first replay uploads the graph to the device: done here, untimed, not in a decode step.
            self.graph.replay()
            torch.cuda.current_stream().synchronize()

    def replay(self) -> torch.Tensor:
        """Run the captured step again; returns a copy of its output (the next replay overwrites it)."""
        self.graph.replay()
        return self.output.clone()
