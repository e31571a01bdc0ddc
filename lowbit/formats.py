"""What a block-scaled format is: element dtype, scale dtype, block size and the element grid.

OCP Microscaling Formats (MX) v1.0, sec. 5 (E8M0 scale shared by 32 elements; FP8/FP6/FP4 elements);
NVIDIA NVFP4: E2M1 elements, an E4M3 scale per 16 elements and an FP32 per-tensor scale
(arXiv 2509.25149, sec. 2). Per-tensor FP8 (E4M3/E5M2) is the Hopper-native baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FormatKind = Literal["mx", "nvfp4", "tensor"]


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantization format; its element grid is {±m·2^(e-mbits)} with e >= emin, |x| <= elem_max.

    `block_size` 0 means one scale per tensor. `emax` is the exponent of elem_max's binade
    (OCP MX v1.0 Table 1 "emax"), used by the FLOOR shared-exponent rule.
    """

    name: str
    elem_dtype: Any
    scale_dtype: Any | None
    block_size: int
    kind: FormatKind
    # dtype of QArray.data: the element dtype, except FP6, which XLA cannot convert to (jax 0.10/0.11
    # CPU: "Invalid XLA PrimitiveType F6E2M3FN"); FP6 values are held exactly in an FP8 container.
    storage_dtype: Any = None

    def __post_init__(self) -> None:
        if self.storage_dtype is None:
            object.__setattr__(self, "storage_dtype", self.elem_dtype)

    @property
    def _finfo(self) -> Any:
        return ml_dtypes.finfo(self.elem_dtype)

    @property
    def elem_max(self) -> float:
        return float(self._finfo.max)

    @property
    def emax(self) -> int:
        return int(np.floor(np.log2(self.elem_max)))

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal element (subnormals share its ulp)."""
        return int(self._finfo.minexp)

    @property
    def mbits(self) -> int:
        return int(self._finfo.nmant)

    @property
    def elem_bits(self) -> int:
        return int(self._finfo.bits)

    @property
    def scale_bits(self) -> int:
        return 0 if self.scale_dtype is None else 8

    @property
    def has_tensor_scale(self) -> bool:
        return self.kind in ("nvfp4", "tensor")

    def __repr__(self) -> str:
        return f"lowbit.{self.name.upper()}"


MXFP8 = Format("mxfp8", jnp.float8_e4m3fn, jnp.float8_e8m0fnu, 32, "mx")
MXFP8_E5M2 = Format("mxfp8_e5m2", jnp.float8_e5m2, jnp.float8_e8m0fnu, 32, "mx")
MXFP6_E2M3 = Format("mxfp6_e2m3", jnp.float6_e2m3fn, jnp.float8_e8m0fnu, 32, "mx", jnp.float8_e4m3fn)
MXFP6_E3M2 = Format("mxfp6_e3m2", jnp.float6_e3m2fn, jnp.float8_e8m0fnu, 32, "mx", jnp.float8_e5m2)
MXFP4 = Format("mxfp4", jnp.float4_e2m1fn, jnp.float8_e8m0fnu, 32, "mx")
NVFP4 = Format("nvfp4", jnp.float4_e2m1fn, jnp.float8_e4m3fn, 16, "nvfp4")
FP8 = Format("fp8", jnp.float8_e4m3fn, None, 0, "tensor")
FP8_E5M2 = Format("fp8_e5m2", jnp.float8_e5m2, None, 0, "tensor")

FORMATS: dict[str, Format] = {
    f.name: f for f in (MXFP8, MXFP8_E5M2, MXFP6_E2M3, MXFP6_E3M2, MXFP4, NVFP4, FP8, FP8_E5M2)
}


def get_format(name: str | Format) -> Format:
    """Look a format up by name (case-insensitive, '-' or '_'); a Format passes through."""
    if isinstance(name, Format):
        return name
    key = str(name).lower().replace("-", "_")
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[key]


def bytes_per_element(fmt: str | Format) -> float:
    """Storage per element: (element bits + scale bits / block size) / 8 (FP4 packed two per byte)."""
    fmt = get_format(fmt)
    if fmt.block_size == 0:
        return fmt.elem_bits / 8
    return (fmt.elem_bits + fmt.scale_bits / fmt.block_size) / 8
