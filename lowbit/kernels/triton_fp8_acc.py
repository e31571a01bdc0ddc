"""FP8 accumulation for Pallas Triton dots: sets `tt.dot`'s `maxNumImpreciseAcc` attribute (default 128).

Triton's WGMMA lowering (sm_90): an FP8 dot with an f32 accumulator and maxNumImpreciseAcc = n <= its K tile
adds its partial sum into a separate f32 accumulator every n K elements; n > K tile never does (fast
accumulation: Hopper's FP8 accumulator keeps ~14 bits; Python Triton's sm_90 default is n = 2^30,
DeepSeek-V3 (arXiv:2412.19437 sec. 3.3.2) promotes every 128). jax's Pallas Triton lowering leaves n = 0,
so every WGMMA result is promoted and async WGMMA / accumulator-init optimizations are off.

PRIVATE-API SHIM, kept in this one module: jax has no public knob for this. It wraps the rule for
`lax.dot_general_p` in `jax._src.pallas.triton.lowering.triton_lowering_rules` (layout checked on jax 0.10.2
and 0.11): the wrapper calls jax's rule, finds the `tt.dot` ops it added to the current block and sets
`maxNumImpreciseAcc` on those whose A operand is FP8. A jax whose layout differs gets a RuntimeError naming
its version, never a silent no-op. Installed only while a value is set (idempotent, reversible).

The setting is process-wide but reaches only lowbit's own kernels (Pallas kernels named `lowbit_*`; a
user's Pallas FP8 kernels keep jax's accumulation) and acts at lowering time, i.e. when the enclosing
jit is lowered, not when it is traced. Changing it clears jax's caches (`jax.clear_caches`) so functions
lowered before the change are lowered again with the new value.
`$LOWBIT_FP8_MAX_IMPRECISE_ACC` (an int, or "none" for jax's default) gives the starting value, read at
first use; unset, it is DEFAULT = 128. Measured on an H100 (docs/benchmarks.md): the FP8 grouped GEMM runs
1.74-1.90x faster than at jax's default, with 1.3e-4 relative rms error against float64 (jax's default:
2e-7 to 1e-6; XLA's own cuBLAS FP8 GEMM on the same operands: 1.3e-3 to 2e-3). The built-in default never
fails a run: on a jax whose layout the shim does not know it warns and keeps jax's default; a value set
explicitly raises instead.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ENV_VAR = "LOWBIT_FP8_MAX_IMPRECISE_ACC"
KERNEL_PREFIX = "lowbit_"  # the pallas_call names of lowbit's kernels (grouped_pallas): the only ones marked
DEFAULT = 128  # promote to f32 every 128 K elements (DeepSeek-V3); measured above
_I32_MAX = 2**31 - 1  # the attribute is an i32 (Triton reads it as uint32; keep it non-negative)

_setting: int | None = None
_env_read = False
_strict = True  # False while the built-in DEFAULT is in force: layout problems warn and fall back
_original_rule: Callable[..., Any] | None = None
_patched_dots = 0  # FP8 tt.dot ops given the attribute since import: lets a benchmark prove the shim ran


def _layout_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"lowbit.kernels.triton_fp8_acc cannot set maxNumImpreciseAcc on jax {jax.__version__}: {what}. "
        "The shim was written for jax 0.10.2 / 0.11 (jax._src.pallas.triton.lowering.triton_lowering_rules); "
        f"update the shim for this jax, or set {ENV_VAR}=none / call set_fp8_max_imprecise_acc(None).")


def _triton_lowering() -> Any:
    """jax's private Pallas Triton lowering module, checked for the layout the shim relies on."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError as error:
        raise _layout_error(f"jax._src.pallas.triton.lowering does not import ({error})") from error
    rules = getattr(lowering, "triton_lowering_rules", None)
    if not isinstance(rules, dict) or lax.dot_general_p not in rules:
        raise _layout_error("no triton_lowering_rules dict with a rule for lax.dot_general_p")
    dot_op = getattr(getattr(lowering, "tt_dialect", None), "DotOp", None)
    if dot_op is None or getattr(dot_op, "OPERATION_NAME", None) != "tt.dot":
        raise _layout_error("the Triton dialect has no tt.dot op class (tt_dialect.DotOp)")
    if getattr(lowering, "ir", None) is None:
        raise _layout_error("the lowering module does not expose its MLIR ir module")
    return lowering


def _is_fp8_type(element_type: Any) -> bool:
    # Triton's isFP8 covers every Float8 type (E4M3FN, E5M2 and their FNUZ forms); MLIR spells them f8*.
    return str(element_type).startswith("f8")


def _is_fp8_dtype(dtype: Any) -> bool:
    return jnp.dtype(dtype).itemsize == 1 and jnp.issubdtype(dtype, jnp.floating)


def _block_ops(block: Any) -> list[Any]:
    return [op.operation for op in block.operations]


def _mark_new_fp8_dots(new_ops: list[Any], n: int, ir: Any) -> int:
    """Sets maxNumImpreciseAcc = n on the tt.dot ops among new_ops whose A operand is FP8; their count."""
    marked = 0
    for op in new_ops:
        if op.name != "tt.dot":
            continue
        a_type = ir.RankedTensorType(op.operands[0].type)
        if _is_fp8_type(a_type.element_type):
            op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), n)
            marked += 1
    return marked


def _make_wrapper(original: Callable[..., Any], lowering: Any) -> Callable[..., Any]:
    ir = lowering.ir

    def dot_general_with_fp8_acc(ctx: Any, *args: Any, **params: Any) -> Any:
        global _patched_dots
        n = _setting
        if n is None or not ctx.avals_in or not _is_fp8_dtype(ctx.avals_in[0].dtype):
            return original(ctx, *args, **params)  # only an FP8 A operand triggers Triton's promotion
        kernel = getattr(getattr(ctx, "context", None), "name", None)  # ModuleContext.name: the kernel's
        if not isinstance(kernel, str):
            _layout_problem("the dot_general lowering context has no kernel name (ctx.context.name)")
            return original(ctx, *args, **params)
        if not kernel.startswith(KERNEL_PREFIX):
            return original(ctx, *args, **params)  # someone else's kernel: jax's accumulation
        try:
            block = ir.InsertionPoint.current.block
        except (ValueError, AttributeError) as error:
            _layout_problem(f"no MLIR insertion point while lowering dot_general ({error})")
            return original(ctx, *args, **params)
        before = set(_block_ops(block))
        result = original(ctx, *args, **params)
        new_ops = [op for op in _block_ops(block) if op not in before]
        if not any(op.name == "tt.dot" for op in new_ops):
            _layout_problem("jax's dot_general rule added no tt.dot to the current block")
            return result
        marked = _mark_new_fp8_dots(new_ops, n, ir)
        if not marked and not isinstance(params.get("precision"), lax.DotAlgorithmPreset):
            # FP8 avals in but no FP8 tt.dot out: the rule now casts FP8 operands (only an algorithm
            # preset should), so the value would silently do nothing.
            _layout_problem("jax's dot_general rule gave its FP8 operands to no FP8 tt.dot")
        _patched_dots += marked
        return result

    dot_general_with_fp8_acc.lowbit_original_rule = original  # type: ignore[attr-defined]
    return dot_general_with_fp8_acc


def _layout_problem(what: str) -> None:
    """A value set explicitly raises; the built-in default warns once and falls back to jax's default."""
    global _setting
    if _strict:
        raise _layout_error(what)
    warnings.warn(f"{_layout_error(what)} Running with jax's default FP8 accumulation.", stacklevel=3)
    # Off for the dots lowered after this one (no warning per dot; get_fp8_max_imprecise_acc() says None). No
    # cache clearing mid-lowering: dots marked before this one were FP8 dots the shim did handle.
    _setting = None


def _install() -> None:
    global _original_rule
    lowering = _triton_lowering()
    rules = lowering.triton_lowering_rules
    current = rules[lax.dot_general_p]
    if hasattr(current, "lowbit_original_rule"):
        return  # already installed
    _original_rule = current
    rules[lax.dot_general_p] = _make_wrapper(current, lowering)


def _uninstall() -> None:
    global _original_rule
    if _original_rule is None:
        return
    from jax._src.pallas.triton import lowering

    rules = lowering.triton_lowering_rules
    if getattr(rules.get(lax.dot_general_p), "lowbit_original_rule", None) is _original_rule:
        rules[lax.dot_general_p] = _original_rule
    _original_rule = None


def _check_value(n: Any, source: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{source} must be an int or None, got {type(n).__name__} {n!r}; e.g. 128, or None "
                        "for jax's default (promote every WGMMA)")
    if not 0 <= n <= _I32_MAX:
        raise ValueError(f"{source} must be in [0, 2^31 - 1], got {n}; use 128 (promote every 128 K "
                         "elements) or 2**30 (Triton's fast-accumulation default)")
    return n


def parse_setting(text: str, source: str) -> int | None:
    """A setting written as text: "none" (any case) is None, jax's default; else an int in [0, 2^31 - 1].
    Bad text raises ValueError naming `source` ($LOWBIT_FP8_MAX_IMPRECISE_ACC, a tool's flag)."""
    raw = text.strip()
    if raw.lower() == "none":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{source} must be an int (e.g. 128) or 'none' (jax's default), "
                         f"got {raw!r}") from None
    return _check_value(value, source)


def _read_env() -> None:
    global _env_read, _strict
    if _env_read:
        return
    raw = os.environ.get(ENV_VAR, "").strip()
    # The starting value: nothing was lowered under another one worth dropping, and this may run mid-trace.
    if raw:
        _strict = True
        _apply(parse_setting(raw, f"${ENV_VAR} (unset: lowbit's default, {DEFAULT})"), clear_caches=False)
    else:
        _strict = False
        try:
            _apply(DEFAULT, clear_caches=False)
        except RuntimeError as error:  # an unknown jax layout: the default must not fail a run
            warnings.warn(f"{error} Running with jax's default FP8 accumulation.", stacklevel=2)
            _apply(None, clear_caches=False)
    # Marked read only once applied: a bad value (or an unknown jax layout) raises on every use instead
    # of once and then silently running without the setting.
    _env_read = True


def _apply(n: int | None, *, clear_caches: bool = True) -> None:
    global _setting
    if n is not None:
        _install()  # raises on an unknown jax layout before anything changes
    changed = n != _setting
    _setting = n
    if n is None:
        _uninstall()
    if changed and clear_caches:
        jax.clear_caches()  # lowerings cached under the old value would otherwise be reused


def set_fp8_max_imprecise_acc(n: int | None) -> None:
    """Sets maxNumImpreciseAcc = n on every Pallas Triton FP8 dot lowered from now on (None: jax's default).

    n <= the dot's K tile: promote to f32 every n K elements (128: DeepSeek-V3); n > K tile: never (2**30).
    """
    global _env_read, _strict
    n = _check_value(n, "set_fp8_max_imprecise_acc(n)")
    _env_read = True  # an explicit call overrides $LOWBIT_FP8_MAX_IMPRECISE_ACC and DEFAULT
    _apply(n)  # raises on an unknown jax layout before anything changes
    _strict = True


def get_fp8_max_imprecise_acc() -> int | None:
    """The value in force: set_fp8_max_imprecise_acc's, else $LOWBIT_FP8_MAX_IMPRECISE_ACC's, else DEFAULT
    (None: jax's default, promote every WGMMA)."""
    _read_env()
    return _setting


@contextlib.contextmanager
def fp8_max_imprecise_acc(n: int | None) -> Iterator[None]:
    """Context manager form: the setting is n inside the block (lower the jit inside it), restored after.

    Not thread-local: other threads lowering Pallas Triton FP8 dots meanwhile see n too. Restores the value
    and its strictness (the built-in DEFAULT stays soft: a layout problem warns rather than raises).
    """
    global _strict
    previous = get_fp8_max_imprecise_acc()
    previous_strict = _strict
    set_fp8_max_imprecise_acc(n)
    try:
        yield
    finally:
        set_fp8_max_imprecise_acc(previous)
        _strict = previous_strict


def ensure_env_setting() -> None:
    """Applies $LOWBIT_FP8_MAX_IMPRECISE_ACC or DEFAULT once (kernels call this when they build a launch)."""
    _read_env()


def patched_dot_count() -> int:
    """FP8 tt.dot ops given maxNumImpreciseAcc since import (a benchmark checks it moved: the shim ran)."""
    return _patched_dots
