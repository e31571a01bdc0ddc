"""lowbit.kernels.triton_fp8_acc: maxNumImpreciseAcc on the Pallas Triton FP8 dots, checked in the lowered IR.

grouped_matmul is lowered for "cuda" on the CPU (as test_grouped_pallas's Triton lowering test); the Triton
module rides as MLIR bytecode in the custom call's backend_config `ir` field. The test parses it back in
its own MLIR context with the Triton dialect and reads every tt.dot's A element type and attribute.
"""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from lowbit.kernels import triton_fp8_acc
from lowbit.kernels.grouped_pallas import grouped_matmul, grouped_wgrad

pytest.importorskip("jax.experimental.pallas.triton")
ir = pytest.importorskip("jaxlib.mlir.ir")
tt_dialect = pytest.importorskip("jaxlib.triton.dialect")
jax_mlir = pytest.importorskip("jax.interpreters.mlir")

ROWS, K, N, E = 256, 256, 128, 4
SIZES = jax.ShapeDtypeStruct((E,), jnp.int32)
E4M3 = jnp.float8_e4m3fn


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    monkeypatch.delenv(triton_fp8_acc.ENV_VAR, raising=False)
    triton_fp8_acc.set_fp8_max_imprecise_acc(None)
    yield
    triton_fp8_acc.set_fp8_max_imprecise_acc(None)


def _forward(x, w, g):
    return grouped_matmul(x, w, g, preferred_element_type=jnp.bfloat16, rhs_layout="enk", interpret=False)


def _forward_backward(x, w, g, dy):  # fprop, dgrad and wgrad kernels: three launches
    return jax.vjp(lambda a, b: _forward(a, b, g), x, w)[1](dy)


def _fp8_args(lhs_dtype=E4M3, rhs_dtype=E4M3):
    return jax.ShapeDtypeStruct((ROWS, K), lhs_dtype), jax.ShapeDtypeStruct((E, N, K), rhs_dtype), SIZES


def _bf16_args():
    return (jax.ShapeDtypeStruct((ROWS, K), jnp.bfloat16), jax.ShapeDtypeStruct((E, N, K), jnp.bfloat16),
            SIZES, jax.ShapeDtypeStruct((ROWS, N), jnp.bfloat16))


def _walk(op, visit):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                visit(child.operation)
                _walk(child.operation, visit)


def _triton_modules(fn, *args) -> list[bytes]:
    """The Triton bytecode of every Pallas launch in fn lowered for a GPU (the shim acts in lowering)."""
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = []

    def visit(op):
        if op.name == "stablehlo.custom_call" and "xla.gpu.triton" in str(op.attributes["call_target_name"]):
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            found.append(ir.StringAttr(config["ir"]).value_bytes)

    _walk(module.operation, visit)
    return found


def _dots(fn, *args) -> list[tuple[str, int]]:
    """(A element type, maxNumImpreciseAcc) of every tt.dot, parsed back from the bytecode."""
    dots = []
    for bytecode in _triton_modules(fn, *args):
        context = jax_mlir.make_ir_context()
        tt_dialect.register_dialect(context)
        context.load_all_available_dialects()
        with context:
            module = ir.Module.parse(bytecode)

            def visit(op):
                if op.name == "tt.dot":
                    # The Triton dialect's own accessor (ODS name), not the shim's string: a misspelt
                    # attribute in the shim would leave this at jax's 0.
                    acc = ir.IntegerAttr(op.opview.maxNumImpreciseAcc).value  # tt_dialect.DotOp view
                    dots.append((str(ir.RankedTensorType(op.operands[0].type).element_type), acc))

            _walk(module.operation, visit)
    return dots


def test_fp8_dot_gets_the_value_only_while_set_and_default_comes_back():
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 0)]  # jax's default: promote every WGMMA
    before = triton_fp8_acc.patched_dot_count()
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() == 128
    # Same function object again: the setter must drop jax's cached lowering, or 0 would come back.
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 128)]
    assert triton_fp8_acc.patched_dot_count() == before + 1
    triton_fp8_acc.set_fp8_max_imprecise_acc(2**30)  # Python Triton's sm_90 default
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 2**30)]
    triton_fp8_acc.set_fp8_max_imprecise_acc(None)
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 0)]


def _user_fp8_dot(x, w):
    """A Pallas FP8 kernel of someone else's (not named lowbit_*): x [64, 32] . w [64, 32]^T."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                          name="user_fp8_dot", interpret=False,
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))(x, w)


def test_only_lowbit_kernels_are_marked():
    """The setting is process-wide but a user's own Pallas FP8 kernel keeps jax's accumulation."""
    user_args = (jax.ShapeDtypeStruct((64, 32), E4M3), jax.ShapeDtypeStruct((64, 32), E4M3))
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    assert _dots(_user_fp8_dot, *user_args) == [("f8E4M3FN", 0)]
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 128)]


def _wgrad(a, b, g):  # the other lowbit kernel (lowbit_grouped_wgrad), FP8 operands as given
    return grouped_wgrad(a, b, g, preferred_element_type=jnp.float32, interpret=False)


def _vmapped_forward(x, w, g):
    return jax.vmap(_forward)(x, w, g)


@pytest.mark.parametrize("fn, args", [
    (jax.jit(jax.jit(_forward)), _fp8_args()),  # nested jits must not rename the kernel
    (jax.checkpoint(_forward), _fp8_args()),
    (_vmapped_forward, (jax.ShapeDtypeStruct((2, ROWS, K), E4M3), jax.ShapeDtypeStruct((2, E, N, K), E4M3),
                        jax.ShapeDtypeStruct((2, E), jnp.int32))),
    (_wgrad, (jax.ShapeDtypeStruct((ROWS, 128), E4M3), jax.ShapeDtypeStruct((ROWS, 64), E4M3), SIZES)),
], ids=["jit_of_jit", "checkpoint", "vmap", "wgrad_kernel"])
def test_every_lowbit_kernel_keeps_its_name_under_transforms(fn, args):
    """The mark keys on the kernel name: a renamed kernel (or a name jax rewrote) would silently lose it."""
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    assert _dots(fn, *args) == [("f8E4M3FN", 128)]


def _fake_ctx(context):
    return types.SimpleNamespace(avals_in=[types.SimpleNamespace(dtype=E4M3)], context=context)


def test_kernel_name_check_keeps_the_soft_strict_rules(monkeypatch):
    """Another kernel's FP8 dot: jax's rule, no warning, setting kept; no name: raise if set, else warn."""
    from jax._src.pallas.triton import lowering  # private: the module the shim wraps

    wrapper = triton_fp8_acc._make_wrapper(lambda ctx, *a, **kw: "jax's rule", lowering)
    for strict in (True, False):
        monkeypatch.setattr(triton_fp8_acc, "_strict", strict)
        monkeypatch.setattr(triton_fp8_acc, "_setting", 128)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a user's kernel is not a layout problem: no warning
            assert wrapper(_fake_ctx(types.SimpleNamespace(name="user_kernel"))) == "jax's rule"
        assert triton_fp8_acc._setting == 128
    monkeypatch.setattr(triton_fp8_acc, "_strict", True)
    with pytest.raises(RuntimeError, match="no kernel name"):
        wrapper(_fake_ctx(types.SimpleNamespace()))
    monkeypatch.setattr(triton_fp8_acc, "_strict", False)
    with pytest.warns(UserWarning, match="no kernel name"):
        assert wrapper(_fake_ctx(None)) == "jax's rule"
    assert triton_fp8_acc._setting is None  # the soft default really falls back


def test_install_is_idempotent_and_off_restores_jaxs_rule():
    from jax._src.pallas.triton import lowering  # private: the registry the shim wraps

    original = lowering.triton_lowering_rules[lax.dot_general_p]
    triton_fp8_acc.set_fp8_max_imprecise_acc(64)
    wrapped = lowering.triton_lowering_rules[lax.dot_general_p]
    assert wrapped is not original
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    assert lowering.triton_lowering_rules[lax.dot_general_p] is wrapped  # not wrapped twice
    triton_fp8_acc.set_fp8_max_imprecise_acc(None)
    assert lowering.triton_lowering_rules[lax.dot_general_p] is original


def test_bf16_dots_are_never_changed():
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    dots = _dots(_forward_backward, *_bf16_args())
    assert sorted(dots) == [("bf16", 0)] * 3  # fprop, dgrad, wgrad


def test_mixed_fp8_operands_widen_to_a_bf16_dot_that_stays_unmarked():
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)  # e4m3 x e5m2: grouped_pallas dots them in bfloat16
    assert _dots(_forward, *_fp8_args(E4M3, jnp.float8_e5m2)) == [("bf16", 0)]


def test_context_manager_restores_the_previous_value():
    triton_fp8_acc.set_fp8_max_imprecise_acc(256)
    with triton_fp8_acc.fp8_max_imprecise_acc(32):
        assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 32)]
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() == 256
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 256)]


def test_env_var_sets_the_starting_value_at_first_use(monkeypatch):
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)  # as in a fresh process: nothing read,
    jax.clear_caches()  # nothing traced yet
    monkeypatch.setenv(triton_fp8_acc.ENV_VAR, "128")
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 128)]  # grouped_matmul reads it when traced
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() == 128


def test_unset_env_var_gives_the_builtin_default_and_none_gives_jaxs(monkeypatch):
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)  # a fresh process with the variable unset
    jax.clear_caches()
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", triton_fp8_acc.DEFAULT)]
    assert triton_fp8_acc.DEFAULT == 128
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    monkeypatch.setenv(triton_fp8_acc.ENV_VAR, "none")
    triton_fp8_acc.ensure_env_setting()
    jax.clear_caches()
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() is None
    assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 0)]


def test_builtin_default_on_an_unknown_jax_layout_warns_and_keeps_jaxs_default(monkeypatch):
    from jax._src.pallas.triton import lowering

    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    monkeypatch.setattr(lowering, "triton_lowering_rules", {})
    with pytest.warns(UserWarning, match=f"jax {jax.__version__}"):
        assert triton_fp8_acc.get_fp8_max_imprecise_acc() is None


def test_builtin_default_warns_where_an_explicit_value_raises(monkeypatch):
    """A rule that no longer hands FP8 operands to tt.dot: the default warns, an explicit 128 raises."""
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    jax.clear_caches()
    triton_fp8_acc.ensure_env_setting()  # the default, 128
    monkeypatch.setattr(triton_fp8_acc, "_is_fp8_type", lambda element_type: False)  # as if cast
    with pytest.warns(UserWarning, match="no FP8 tt.dot"):
        assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 0)]


def _two_launches(x, w, g):  # two FP8 Pallas launches (two shapes) in one jit: two tt.dot lowerings
    return _forward(x, w, g), _forward(x[: ROWS // 2], w, g)


def test_builtin_default_warns_once_then_reports_and_runs_jaxs_default(monkeypatch):
    """The fallback the warning announces is real: one warning, not one per dot, and the getter says None."""
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    jax.clear_caches()
    triton_fp8_acc.ensure_env_setting()  # the default, 128, soft
    monkeypatch.setattr(triton_fp8_acc, "_is_fp8_type", lambda element_type: False)  # as if cast
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no once-per-location filtering: count every warning issued
        dots = _dots(_two_launches, *_fp8_args())
    assert dots == [("f8E4M3FN", 0)] * 2
    assert [str(w.message).count("no FP8 tt.dot") for w in caught] == [1]
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() is None


def test_context_manager_keeps_the_builtin_default_soft(monkeypatch):
    """Entering and leaving the context under the built-in default restores 128 *and* its warn-not-raise."""
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    jax.clear_caches()
    with triton_fp8_acc.fp8_max_imprecise_acc(256):
        assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 256)]
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() == triton_fp8_acc.DEFAULT
    monkeypatch.setattr(triton_fp8_acc, "_is_fp8_type", lambda element_type: False)  # as if cast
    with pytest.warns(UserWarning, match="no FP8 tt.dot"):
        assert _dots(_forward, *_fp8_args()) == [("f8E4M3FN", 0)]


def test_bad_env_var_raises_naming_it(monkeypatch):
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    monkeypatch.setenv(triton_fp8_acc.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=triton_fp8_acc.ENV_VAR):
        triton_fp8_acc.get_fp8_max_imprecise_acc()


def test_bad_env_var_keeps_raising_instead_of_running_without_it(monkeypatch):
    monkeypatch.setattr(triton_fp8_acc, "_env_read", False)
    monkeypatch.setenv(triton_fp8_acc.ENV_VAR, "-1")
    for _ in range(2):  # the second use must not fall back silently to jax's default
        with pytest.raises(ValueError, match=triton_fp8_acc.ENV_VAR):
            triton_fp8_acc.get_fp8_max_imprecise_acc()


def test_fp8_dot_left_unmarked_by_jax_rule_raises(monkeypatch):
    """A jax whose rule casts FP8 operands before tt.dot would make the setting a silent no-op."""
    triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    monkeypatch.setattr(triton_fp8_acc, "_is_fp8_type", lambda element_type: False)  # as if cast
    with pytest.raises(RuntimeError, match="no FP8 tt.dot"):
        _dots(_forward, *_fp8_args())


@pytest.mark.parametrize("value, error", [(True, TypeError), (128.0, TypeError), ("128", TypeError),
                                          (-1, ValueError), (2**31, ValueError)])
def test_bad_values_raise_naming_the_fix(value, error):
    with pytest.raises(error, match="128"):
        triton_fp8_acc.set_fp8_max_imprecise_acc(value)
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() is None


def test_unknown_jax_layout_raises_naming_the_version(monkeypatch):
    from jax._src.pallas.triton import lowering

    monkeypatch.setattr(lowering, "triton_lowering_rules", {})
    with pytest.raises(RuntimeError, match=f"jax {jax.__version__}"):
        triton_fp8_acc.set_fp8_max_imprecise_acc(128)
    assert triton_fp8_acc.get_fp8_max_imprecise_acc() is None
