"""star-sp: Star Attention (Acharya, Jia, Ginsburg, 2024) as a sequence-parallel attention module."""

from .config import StarConfig
from .errors import BackendUnavailableError, StarCollectiveError, StarError, StarInputError
from .layout import BlockLayout

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BlockLayout", "StarCollectiveError", "StarConfig", "StarError",
    "StarInputError", "__version__",
]
