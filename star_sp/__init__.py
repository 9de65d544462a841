"""star-sp: Star Attention (Acharya, Jia, Ginsburg, 2024) as a sequence-parallel attention module."""

from .config import StarConfig
from .errors import BackendUnavailableError, StarCollectiveError, StarError, StarInputError
from .layout import BlockLayout
from .models import reference_model_path
from .runtime.sampling import SamplingConfig


def __getattr__(name):  # the engine pulls in the transformers adapter: import it only when asked
    if name in ("StarEngine", "StarContext"):
        from .integrations.hf.engine import StarEngine
        from .runtime.passes import StarContext

        return {"StarEngine": StarEngine, "StarContext": StarContext}[name]
    raise AttributeError(f"module 'star_sp' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BlockLayout", "SamplingConfig", "StarCollectiveError", "StarConfig",
    "StarContext", "StarEngine", "StarError", "StarInputError", "__version__", "reference_model_path",
]
