"""SawInt4Config: the validated settings of a SawInt4Cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, Union

Centering = Union[bool, Literal["auto"]]
BACKENDS = ("auto", "torch", "triton")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class SawInt4Config:
    """How keys and values are stored.

    Args:
        hadamard_block: size of the blocks of the block-diagonal normalized Hadamard rotation applied to each
            head vector before quantization; a power of two that divides the head dim, or 0 for no rotation.
        rotate_values: rotate values as well as keys (the attention output is rotated back).
        center_keys: subtract a per-layer, per-KV-head key mean before rotating and add q·mean back to the
            scores (exact). "auto" centers only the heads where it halves the per-token range of the rotated keys.
        center_values: the same for values (exact, since attention weights sum to one).
        residual_length: the newest tokens of each sequence kept in the model dtype (0: everything in INT4). The
            default 64 is the accuracy study's choice (docs/accuracy.md): on SmolLM2-135M it takes the perplexity
            loss from +0.464 (window 0) to +0.032 for a fixed 1.4 MiB per sequence in bfloat16.
        page_size: tokens per page of the paged INT4 pool; a power of two, at least 16.
        backend: "torch" (pure PyTorch, any device), "triton" (fused kernels), or "auto".

    ``hadamard_block=0, center_keys=False`` is plain (naive) asymmetric INT4.
    """

    hadamard_block: int = 64
    rotate_values: bool = True
    center_keys: Centering = "auto"
    center_values: Centering = False
    residual_length: int = 64
    page_size: int = 64
    backend: str = "auto"

    def __post_init__(self):
        block = self.hadamard_block
        if isinstance(block, bool) or not isinstance(block, int) or (block != 0 and (block < 2 or not _is_power_of_two(block))):
            raise ValueError(
                f"SawInt4Config.hadamard_block must be 0 (no rotation) or a power of two >= 2 (2, 4, ..., 64, 128, ...), "
                f"got {block!r}."
            )
        if not isinstance(self.rotate_values, bool):
            raise ValueError(f"SawInt4Config.rotate_values must be True or False, got {self.rotate_values!r}.")
        for name in ("center_keys", "center_values"):
            value = getattr(self, name)
            if value not in (True, False, "auto") or (not isinstance(value, (bool, str))):
                raise ValueError(f"SawInt4Config.{name} must be True, False or 'auto', got {value!r}.")
        residual = self.residual_length
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise ValueError(f"SawInt4Config.residual_length must be an integer >= 0, got {residual!r}.")
        page = self.page_size
        if isinstance(page, bool) or not isinstance(page, int) or page < 16 or not _is_power_of_two(page):
            raise ValueError(f"SawInt4Config.page_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {page!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"SawInt4Config.backend must be one of {BACKENDS}, got {self.backend!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
