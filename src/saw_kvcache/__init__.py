"""saw_kvcache: a 4-bit (SAW-INT4) KV cache for HuggingFace transformers.

    import saw_kvcache                                   # registers attn_implementation="saw_int4"
    from saw_kvcache import SawInt4Cache, SawInt4Config
    model.generate(input_ids, past_key_values=SawInt4Cache())
"""

from .config import SawInt4Config
from .integration import ATTN_IMPLEMENTATION, SawInt4Cache, register

register()

__version__ = "0.1.0"
__all__ = ["ATTN_IMPLEMENTATION", "SawInt4Cache", "SawInt4Config", "__version__"]
