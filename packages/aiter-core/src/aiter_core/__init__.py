"""aiter-core: the shared foundation of the aiter attention-kernel packages.

Importing this package is cheap: it initialises no device, imports no Triton and discovers no
plugins. Those happen on first use.
"""

__version__ = "0.1.0"

from . import dtypes  # noqa: E402
from .arch import ArchInfo, get_arch_info, get_cu_num, get_gfx, get_num_xcds  # noqa: E402
from .ops import register_op  # noqa: E402
from .quant import ActivationType, KVQuant, MlaVersion, QuantType, dequantize_kv, quantize_kv  # noqa: E402
from .registry import (  # noqa: E402
    PLUGIN_API_VERSION,
    BackendSpec,
    Family,
    Problem,
    UnsupportedError,
    dispatch,
    explain,
    select,
)

__all__ = [
    "PLUGIN_API_VERSION",
    "ActivationType",
    "ArchInfo",
    "BackendSpec",
    "Family",
    "KVQuant",
    "MlaVersion",
    "Problem",
    "QuantType",
    "UnsupportedError",
    "__version__",
    "dequantize_kv",
    "dispatch",
    "dtypes",
    "explain",
    "get_arch_info",
    "get_cu_num",
    "get_gfx",
    "get_num_xcds",
    "quantize_kv",
    "register_op",
    "select",
]
