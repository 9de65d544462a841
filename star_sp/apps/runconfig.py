"""The run configuration of the command line: a TOML file, then flags on top (``configs/*.toml``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields

from ..config import DTYPES, StarConfig
from ..errors import StarInputError
from ..runtime.sampling import SamplingConfig


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``star-sp generate`` needs besides its inputs."""

    model: str | None = None
    """Model directory (transformers layout) or hub-style name available offline."""
    random_weights: bool = False
    """Build the model from its config with random weights (benchmarks; no weight files needed)."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    attention: str = "star"
    block_size: int = 4096
    anchor_size: int | None = None
    anchor_source: str = "broadcast"
    phase2_merge: str = "allreduce"
    backend: str = "auto"
    collective_timeout_s: float = 600.0
    decode_graphs: str = "auto"
    """Decode steps as a CUDA graph per request: auto (one process on CUDA), on, off, static."""
    decode_kernel: str = "torch"
    """A fixed-shape decode step's attention: torch, or triton (one split-KV pass; CUDA)."""
    compile: bool = False
    """Fuse the model's element-wise work with torch.compile around Star's attention."""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StarInputError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in ("star", "global", "ring"):
            raise StarInputError(f"attention must be 'star', 'global' or 'ring', got {self.attention!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise StarInputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise StarInputError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.star_config()
        self.sampling()

    def star_config(self) -> StarConfig:
        return StarConfig(block_size=self.block_size, anchor_size=self.anchor_size, anchor_source=self.anchor_source,
                          phase2_merge=self.phase2_merge, backend=self.backend, collective_timeout_s=self.collective_timeout_s,
                          decode_graphs=self.decode_graphs, decode_kernel=self.decode_kernel, compile=self.compile)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed)

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> "RunConfig":
        """Values from the TOML file at ``path`` (if any), then every override that is not None."""
        return load_config(cls, path, overrides)


def load_config(cls, path: str | None, overrides: dict):
    """A config dataclass ``cls`` from the TOML file at ``path`` (if any), then every override that is not
    None; any problem with the file or a value is one ``StarInputError`` line naming it."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise StarInputError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StarInputError(f"config file {path} cannot be read as TOML: {exc}") from None
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StarInputError(f"config file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    try:
        return cls(**values)
    except TypeError as exc:  # a key given a table instead of a value, and the like
        raise StarInputError(f"config: {exc}") from None
