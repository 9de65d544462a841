"""Compiled decoder layers for ``StarConfig(compile=...)``: the model's own element-wise work fused by
``torch.compile``, Star's attention left as it is.

The engine's attention function is excluded from compilation (``torch.compiler.disable`` in
``transformers.py``), so each decoder layer compiles as two graphs, the part before attention (norm,
projections, rotary embedding) and the part after it (output projection, residual adds, norm, MLP),
with Star's attention, its collectives and its LSE kernels running between them as they do uncompiled.
Shapes are dynamic (one compilation serves every context and query length), and the compiled layers
live as long as the engine, so requests after the first compile nothing. The layers' attention modules
share one code object, and torch._dynamo allows a code object 8 compilations: guards on each layer's
own ``layer_idx`` (an int attribute, static by default) and on the pass behind the cache used them up
by the 8th layer, after which the other 24 of a 32-layer model ran their attention modules eagerly
(seen on an H200). The cache's ``update`` runs outside the graphs, like the attention. Inside ``active()`` such int attributes are
symbolic, so one graph serves every layer, and the limit covers every layer in case one still guards.

The user's model is not changed for good: ``active()`` points each layer's ``forward`` at its compiled
form for the length of one engine call and puts it back afterwards. A layer that cannot be compiled
runs eagerly (``torch._dynamo``'s ``suppress_errors``: one warning), as does a model whose decoder
layers are not where transformers keeps them (``model.model.layers``).
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch


class CompiledLayers:
    """Per decoder layer, ``torch.compile(layer.forward, dynamic=True, backend=backend)``; ``seconds`` is
    the time spent compiling during the last ``active()`` block."""

    def __init__(self, base: torch.nn.Module, backend: str):
        layers = getattr(base, "layers", None)
        self.layers = list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else []
        if not self.layers:
            warnings.warn(f"compile: {type(base).__name__} keeps no decoder layers in .layers; running without "
                          "compilation", RuntimeWarning, stacklevel=3)
        self.compiled = [torch.compile(layer.forward, dynamic=True, backend=backend) for layer in self.layers]
        self.seconds = 0.0

    @contextlib.contextmanager
    def active(self):
        """Inside: the layers run compiled; compilation time is added to ``seconds`` (reset first)."""
        from torch._dynamo.callback import callback_handler

        self.seconds = 0.0
        started: list[float] = []

        def start(*_):
            started.append(time.perf_counter())

        def end(*_):
            if started:
                self.seconds += time.perf_counter() - started.pop()

        callback_handler.register_start_callback(start)
        callback_handler.register_end_callback(end)
        own = [layer.__dict__.get("forward") for layer in self.layers]  # forwards set on the instances
        for layer, fn in zip(self.layers, self.compiled):
            layer.forward = fn
        try:
            n = len(self.layers)
            with torch._dynamo.config.patch(suppress_errors=True, allow_unspec_int_on_nn_module=True,
                                            recompile_limit=max(8, 4 * n),
                                            accumulated_recompile_limit=max(256, 8 * n)):
                yield self
        finally:
            for layer, forward in zip(self.layers, own):
                if forward is None:
                    del layer.forward  # the class's forward again
                else:
                    layer.forward = forward
            callback_handler.remove_start_callback(start)
            callback_handler.remove_end_callback(end)
