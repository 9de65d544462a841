"""Collectives and the two phases across hosts. Every function takes ``group=`` explicitly."""

from .agreement import agree
from .collectives import AllReduceMerge, broadcast_anchor
from .guard import guarded_step
from .phase1 import phase1_attention
from .phase2 import phase2_attention
from .ring import ring_attention

__all__ = ["AllReduceMerge", "agree", "broadcast_anchor", "guarded_step", "phase1_attention", "phase2_attention",
           "ring_attention"]
