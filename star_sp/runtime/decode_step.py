"""One decode step with fixed shapes, optionally captured as a CUDA graph (``StarConfig.decode_graphs``).

Decoding is bound by the host: one token of an 8B model is about a thousand kernel launches and their
Python, against a few milliseconds of GPU work. A captured graph replays the launches in one call.

What makes the step replayable: the input ids ``(B, 1)`` and the position ``(1,)`` (or ``(B, 1)``, one
per sequence) live in fixed
device buffers; the model's forward over a ``DecodeStepPass`` writes the step's KV into the
``StaticQueryKV`` at its device-side fill level and attends the whole buffer under a device-side mask;
the step ends by advancing the fill level and the position, inside the graph. So each replay is the
next step, and only the new token ids are copied in before it. The last position's logits come back
in a fixed buffer ``(B, vocab)``.
"""

from __future__ import annotations

import torch

from .kv_cache import StaticQueryKV
from .passes import DecodeStepPass, StarContext


class WarmUpError(RuntimeError):
    """The un-captured run before a capture failed: the step itself failed, not its capture. It ran the
    step's collectives (phase 2's merge) as far as it got, so with several processes it is the
    request's failure, not one to fall back from (``__cause__`` is the original error)."""


class DecodeStep:
    """Decode steps for one request, from ``position`` on. ``capture=True`` (CUDA only) records the step
    once as a graph (after one warm-up run on a side stream, whose KV write lands in the slot the first
    real step overwrites) and replays it; otherwise the same step runs eagerly each time."""

    def __init__(self, engine, context: StarContext, query_kv: StaticQueryKV | None, batch: int,
                 position: "int | torch.Tensor", capture: bool):
        device = engine.device
        self._engine = engine
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        if isinstance(position, torch.Tensor):  # one position per sequence (questions of different lengths)
            self.pos = position.to(device=device, dtype=torch.long).reshape(batch, 1).clone()
        else:
            self.pos = torch.full((1,), position, dtype=torch.long, device=device)
        self.state = DecodeStepPass(context, engine.num_layers, query_kv, check=False)
        self.graph = None
        self.logits = None
        if capture:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                try:  # kernels pick their plans and workspaces outside the capture
                    self._run(advance=False)
                except Exception as exc:  # noqa: BLE001 - see WarmUpError
                    raise WarmUpError(f"{type(exc).__name__}: {exc}") from exc
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._run(advance=True)
            self.graph = graph

    def _run(self, advance: bool) -> torch.Tensor | None:
        holds = self.state.query_kv is not None
        kw = {"logits_to_keep": 1} if holds else {}
        out = self._engine._forward(self.state, self.ids, self.pos, **kw)
        self.state.finish(advance)
        if advance:
            self.pos.add_(1)
        return out.logits[:, -1] if holds else None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Run the step for ``ids: (B, 1)``; returns the logits ``(B, vocab)`` on the query host (a
        buffer the next call overwrites), None elsewhere."""
        self.ids.copy_(ids)
        if self.graph is None:
            return self._run(advance=True)
        self.graph.replay()
        return self.logits
