"""dynas: neural architecture search with dynamic convolution."""

from dynas.errors import DynasError
from dynas.ops import DynamicConv2d
from dynas.temperature import LinearAnneal, dynamic_layers, set_temperature

__version__ = "0.1.0"

__all__ = ["DynamicConv2d", "DynasError", "LinearAnneal", "__version__", "dynamic_layers", "set_temperature"]
