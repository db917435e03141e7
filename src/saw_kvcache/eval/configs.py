"""Named cache configurations for the evaluation: parsing `name=field=value,...` and the preset lists."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import SawInt4Config

FULL = "full precision"
NAIVE = "naive INT4"
# Plain asymmetric INT4: no rotation, no centering, no full-precision window.
NAIVE_FIELDS = dict(hadamard_block=0, rotate_values=False, center_keys=False, center_values=False, residual_length=0)


@dataclasses.dataclass(frozen=True)
class NamedConfig:
    """A row of the evaluation. `fields` are SawInt4Config overrides of the defaults; None is the full-precision
    reference (a DynamicCache with attn_implementation="sdpa")."""

    name: str
    fields: Optional[dict]

    @property
    def is_reference(self) -> bool:
        return self.fields is None

    def config(self, head_dim: int) -> Optional[SawInt4Config]:
        """The SawInt4Config of this row for a model of `head_dim` (the default block is capped at the head dim)."""
        if self.fields is None:
            return None
        fields = dict(self.fields)
        if "hadamard_block" not in fields:
            block = SawInt4Config.hadamard_block
            while block > 1 and head_dim % block:
                block //= 2
            fields["hadamard_block"] = block if block > 1 else 0
        return SawInt4Config(**fields)


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low == "auto":
        return "auto"
    try:
        return int(low)
    except ValueError:
        return text.strip()


def parse_config(spec: str) -> NamedConfig:
    """`"rot64=hadamard_block=64,center_keys=False"` -> NamedConfig("rot64", {...}).

    A spec without fields (`"default"` or `"default="`) is the SawInt4Config defaults; `naive` alone is plain
    INT4. Field names are SawInt4Config's; values are integers, True/False (also on/off) or auto.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"config {spec!r}: expected NAME=field=value,... (e.g. rot64=hadamard_block=64,center_keys=False)")
    if not sep and name.lower() in ("naive", NAIVE.lower()):
        return NamedConfig(NAIVE, dict(NAIVE_FIELDS))
    fields = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"config {spec!r}: {item!r} is not field=value")
        if key not in SawInt4Config.field_names():
            raise ValueError(f"config {spec!r}: unknown field {key!r}; valid: {', '.join(SawInt4Config.field_names())}")
        fields[key] = _parse_value(value)
    SawInt4Config(**fields)  # validate now, with the config's own error message
    return NamedConfig(name, fields)


def _rows(*specs: str) -> list[NamedConfig]:
    return [parse_config(spec) for spec in specs]


PRESETS = {
    # What `saw-kvcache eval` runs without --config (full precision and naive INT4 are always added).
    "quick": lambda: _rows(
        "SAW published (rot, no centering)=center_keys=False,center_values=False,residual_length=0",
        "default, window 0=residual_length=0",
        "default=",  # residual_length=64
    ),
    # The configuration study (`--preset study`): every row the accuracy issue asks for. The rows before the
    # windows are window 0 (residual_length=0; the default is 64 since the study chose it).
    "study": lambda: _rows(
        "center K only (no rotation)=hadamard_block=0,rotate_values=False,center_keys=True,residual_length=0",
        "rot16 K+V=hadamard_block=16,center_keys=False,residual_length=0",
        "rot32 K+V=hadamard_block=32,center_keys=False,residual_length=0",
        "rot64 K+V (SAW published)=hadamard_block=64,center_keys=False,residual_length=0",
        "rot64 K only=hadamard_block=64,rotate_values=False,center_keys=False,residual_length=0",
        "rot64 + center K all=hadamard_block=64,center_keys=True,residual_length=0",
        "rot64 + center K auto (window 0)=residual_length=0",
        "rot64 + center K all + V=hadamard_block=64,center_keys=True,center_values=True,residual_length=0",
        "rot64 + center K auto + V=center_values=True,residual_length=0",
        "default + window 32=residual_length=32",
        "default + window 64=residual_length=64",
        "default + window 128=residual_length=128",
    ),
}


def preset(name: str) -> list[NamedConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_baselines(configs: list[NamedConfig]) -> list[NamedConfig]:
    """Full precision first, naive INT4 second (unless given), then the rest in order; names must be unique."""
    rows = [NamedConfig(FULL, None)]
    if not any(c.fields is not None and _is_naive(c.fields) for c in configs):
        rows.append(NamedConfig(NAIVE, dict(NAIVE_FIELDS)))
    rows += configs
    names = [r.name for r in rows]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"config names must be unique; repeated: {sorted(dup)}")
    return rows


def _is_naive(fields: dict) -> bool:
    cfg = SawInt4Config(**fields)
    return cfg.hadamard_block == 0 and cfg.center_keys is False and cfg.center_values is False and cfg.residual_length == 0
