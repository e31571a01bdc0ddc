"""lowbit.formats: format constants against ml_dtypes.finfo, lookup by name, storage cost."""

import ml_dtypes
import numpy as np
import pytest

import lowbit

# (public name, get_format name, element dtype, scale dtype, block size, kind) from the spec.
FORMAT_TABLE = [
    ("MXFP8", "mxfp8", ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu, 32, "mx"),
    ("MXFP8_E5M2", "mxfp8_e5m2", ml_dtypes.float8_e5m2, ml_dtypes.float8_e8m0fnu, 32, "mx"),
    ("MXFP6_E2M3", "mxfp6_e2m3", ml_dtypes.float6_e2m3fn, ml_dtypes.float8_e8m0fnu, 32, "mx"),
    ("MXFP6_E3M2", "mxfp6_e3m2", ml_dtypes.float6_e3m2fn, ml_dtypes.float8_e8m0fnu, 32, "mx"),
    ("MXFP4", "mxfp4", ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e8m0fnu, 32, "mx"),
    ("NVFP4", "nvfp4", ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn, 16, "nvfp4"),
    ("FP8", "fp8", ml_dtypes.float8_e4m3fn, None, 0, "tensor"),
    ("FP8_E5M2", "fp8_e5m2", ml_dtypes.float8_e5m2, None, 0, "tensor"),
]
IDS = [row[0] for row in FORMAT_TABLE]

# Spec's element parameters (emax, emin, mbits, max), written out to catch a wrong finfo reading too.
ELEMENT_PARAMS = {
    ml_dtypes.float8_e4m3fn: (8, -6, 3, 448.0),
    ml_dtypes.float8_e5m2: (15, -14, 2, 57344.0),
    ml_dtypes.float6_e2m3fn: (2, 0, 3, 7.5),
    ml_dtypes.float6_e3m2fn: (4, -2, 2, 28.0),
    ml_dtypes.float4_e2m1fn: (2, 0, 1, 6.0),
}


@pytest.mark.parametrize("row", FORMAT_TABLE, ids=IDS)
def test_format_constants_match_ml_dtypes(row):
    public, _, elem, scale, block, kind = row
    fmt = getattr(lowbit, public)
    info = ml_dtypes.finfo(elem)
    assert isinstance(fmt, lowbit.Format)
    assert np.dtype(fmt.elem_dtype) == np.dtype(elem)
    assert fmt.elem_max == float(info.max)
    assert fmt.emax == info.maxexp - 1
    assert fmt.emin == info.minexp
    assert fmt.mbits == info.nmant
    assert fmt.elem_bits == info.bits
    assert (fmt.emax, fmt.emin, fmt.mbits, fmt.elem_max) == ELEMENT_PARAMS[elem]
    assert fmt.block_size == block
    assert fmt.kind == kind
    if scale is None:
        assert fmt.scale_dtype is None
    else:
        assert np.dtype(fmt.scale_dtype) == np.dtype(scale)


@pytest.mark.parametrize("row", FORMAT_TABLE, ids=IDS)
def test_get_format_by_name_any_case(row):
    public, name, *_ = row
    fmt = getattr(lowbit, public)
    assert lowbit.get_format(name) == fmt
    assert lowbit.get_format(name.upper()) == fmt
    assert lowbit.get_format(name.title()) == fmt
    assert lowbit.get_format(fmt) is fmt
    assert fmt.name.lower() == name


def test_get_format_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        lowbit.get_format("mxfp3")
    message = str(err.value)
    assert "mxfp3" in message
    for _, name, *_ in FORMAT_TABLE:
        assert name in message.lower()


def test_formats_are_hashable_values():
    """Frozen dataclasses: usable as jit static arguments and dict keys."""
    assert len({getattr(lowbit, public) for public in IDS}) == len(IDS)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError subclasses it
        lowbit.MXFP8.block_size = 16


@pytest.mark.parametrize("public, expected", [
    ("MXFP8", 8.25 / 8), ("MXFP8_E5M2", 8.25 / 8), ("MXFP6_E2M3", 6.25 / 8), ("MXFP6_E3M2", 6.25 / 8),
    ("MXFP4", 4.25 / 8), ("NVFP4", 4.5 / 8), ("FP8", 1.0), ("FP8_E5M2", 1.0),
])
def test_bytes_per_element(public, expected):
    assert lowbit.bytes_per_element(getattr(lowbit, public)) == expected
