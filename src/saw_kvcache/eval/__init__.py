"""Accuracy of the 4-bit cache on a model and a text: `saw-kvcache eval` and its Python API.

    from saw_kvcache.eval import run_eval
    result = run_eval("smollm2", ["/usr/share/common-licenses/GPL-3"], tokens=2048, out_dir="eval_out")
"""

from .configs import FULL, NAIVE, NamedConfig, parse_config, preset
from .memory import kv_memory
from .models import load_model, with_key_bias
from .passkey import passkey_eval
from .runner import run_eval
from .scoring import score_configs

__all__ = [
    "FULL", "NAIVE", "NamedConfig", "kv_memory", "load_model", "parse_config", "passkey_eval", "preset", "run_eval",
    "score_configs", "with_key_bias",
]
