"""LLVM vector intrinsics for the numba kernels: vectors of 8 or 16 float64.

LLVM does not vectorise the per-pixel loops of the active-set method on its
own (nor the register-blocked band sums), so the vector kernel
(:mod:`qdquant.unmixing.kernels.lanes`) writes them with these: a numba type
for the LLVM vectors ``<n x double>`` (n = 8: 8 pixels, or a pixel's
variables for K <= 8; n = 16: a pixel's variables for K <= 16, which LLVM
splits over two registers), and intrinsics for the few operations they
need. The arithmetic, compares, selects and reductions take either width
(all operands alike); loads and splats take the width as a literal
argument. Lane masks are int64 bit masks (bit i = lane i), the same form as
the passive-set codes.

Also here: stack arrays without reference counting (:func:`stack_f8`,
:func:`stack_i8`), raw data pointers and the lowest set bit of an integer.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

@intrinsic
def stack_f8(typingctx, n):
    """Pointer to ``n`` (a literal int) float64 on the calling function's stack.

    ``numba.carray(stack_f8(8), 8)`` is an array without reference
    counting that LLVM can keep in registers (a small heap array would be
    stored and reloaded at every update).
    """
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float64), size=size)

    return types.CPointer(types.float64)(n), codegen


@intrinsic
def stack_i8(typingctx, n):
    """Pointer to ``n`` (a literal int) int64 on the calling function's stack
    (as ``stack_f8``; no heap array, no reference counting)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.int64), size=size)

    return types.CPointer(types.int64)(n), codegen


class F8xN(types.Type):
    """The numba type of an LLVM vector of ``n`` float64."""

    def __init__(self, n):
        self.n = n
        super().__init__(name=f"qdquant_f8x{n}")


_F8X8 = F8xN(8)
_V8 = ir.VectorType(ir.DoubleType(), 8)


@register_model(F8xN)
class _F8xNModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.DoubleType(), fe_type.n))


def _llvm_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _item_ptr(context, builder, aryty, ary, inds):
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer2(context, builder, data=arr.data,
                                      shape=cgutils.unpack_tuple(builder, arr.shape),
                                      strides=cgutils.unpack_tuple(builder, arr.strides),
                                      layout=aryty.layout, inds=inds, wraparound=False)


def _is_f8_vector(*tys):
    """All of ``tys`` are the same vector type."""
    return isinstance(tys[0], F8xN) and all(t == tys[0] for t in tys)


def _vty(ty):
    """The LLVM type of a vector type."""
    return ir.VectorType(ir.DoubleType(), ty.n)


@intrinsic
def v_load(typingctx, arr, i, n):
    """``arr[i:i + n]`` (1-D float64 array) as a vector of ``n`` (a literal 8 or 16)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.float64
            and isinstance(n, types.IntegerLiteral)):
        return None
    vt = F8xN(n.literal_value)

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])
        return builder.load(builder.bitcast(p, _vty(vt).as_pointer()), align=8)

    return vt(arr, types.intp, n), codegen


@intrinsic
def v_store(typingctx, arr, i, v):
    """``arr[i:i + n] = v`` (1-D float64 array, a vector of n)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.float64
            and _is_f8_vector(v)):
        return None

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])
        builder.store(args[2], builder.bitcast(p, _vty(sig.args[2]).as_pointer()), align=8)
        return context.get_dummy_value()

    return types.none(arr, types.intp, v), codegen


@intrinsic
def v_load_row(typingctx, arr, c, y, x):
    """``arr[c, y, x:x + 8]`` of a 3-D array, converted to float64.

    The last axis must have unit stride (checked by the caller).
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 3
            and isinstance(arr.dtype, (types.Integer, types.Float))):
        return None
    dt = arr.dtype

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], list(args[1:]))
        ety = context.get_data_type(dt)
        vt = ir.VectorType(ety, 8)
        v = builder.load(builder.bitcast(p, vt.as_pointer()), align=context.get_abi_alignment(ety))
        if isinstance(dt, types.Float):
            return v if dt.bitwidth == 64 else builder.fpext(v, _V8)
        return builder.sitofp(v, _V8) if dt.signed else builder.uitofp(v, _V8)

    return _F8X8(arr, types.intp, types.intp, types.intp), codegen


@intrinsic
def v_store_row_f4(typingctx, arr, c, y, x, v):
    """``arr[c, y, x:x + 8] = float32(v)`` (3-D float32 array, unit last stride)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 3 and arr.dtype == types.float32
            and v == _F8X8):
        return None

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], list(args[1:4]))
        vt = ir.VectorType(ir.FloatType(), 8)
        builder.store(builder.fptrunc(args[4], vt), builder.bitcast(p, vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.intp, types.intp, v), codegen


@intrinsic
def v_dataptr(typingctx, arr):
    """Data pointer of an array, for ``_v_loadp``: no reference counting
    (an array passed to an inlined function is counted at every call)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def v_loadp(typingctx, p, i, n):
    """``p[i:i + n]`` (float64 pointer) as a vector of ``n`` (a literal 8 or 16)."""
    if not (isinstance(p, types.CPointer) and p.dtype == types.float64
            and isinstance(n, types.IntegerLiteral)):
        return None
    vt = F8xN(n.literal_value)

    def codegen(context, builder, sig, args):
        q = builder.gep(args[0], [args[1]])
        return builder.load(builder.bitcast(q, _vty(vt).as_pointer()), align=8)

    return vt(p, types.intp, n), codegen


@intrinsic
def v_splat(typingctx, x, n):
    """Vector of ``n`` (a literal 8 or 16) copies of the float ``x``."""
    if not (isinstance(x, types.Float) and isinstance(n, types.IntegerLiteral)):
        return None
    vt = F8xN(n.literal_value)

    def codegen(context, builder, sig, args):
        val = context.cast(builder, args[0], sig.args[0], types.float64)
        undef = ir.Constant(_vty(vt), ir.Undefined)
        v = builder.insert_element(undef, val, ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.n), [0] * vt.n)
        return builder.shuffle_vector(v, undef, mask)

    return vt(x, n), codegen


def _v_binop(name, doc):
    @intrinsic
    def op(typingctx, a, b):
        if not _is_f8_vector(a, b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])

        return a(a, b), codegen

    op.__doc__ = doc
    return op


v_add = _v_binop("fadd", "a + b")
v_sub = _v_binop("fsub", "a - b")
v_mul = _v_binop("fmul", "a * b")
v_div = _v_binop("fdiv", "a / b")


def _v_unary(llvm_name, doc):
    @intrinsic
    def op(typingctx, a):
        if not _is_f8_vector(a):
            return None

        def codegen(context, builder, sig, args):
            vt = _vty(sig.args[0])
            fn = _llvm_fn(builder, f"llvm.{llvm_name}.v{vt.count}f64", vt, [vt])
            return builder.call(fn, list(args))

        return a(a), codegen

    op.__doc__ = doc
    return op


v_abs = _v_unary("fabs", "|a|")
v_sqrt = _v_unary("sqrt", "sqrt(a)")


@intrinsic
def v_fma(typingctx, a, b, c):
    """``a * b + c``, rounded once."""
    if not _is_f8_vector(a, b, c):
        return None

    def codegen(context, builder, sig, args):
        vt = _vty(sig.args[0])
        return builder.call(_llvm_fn(builder, f"llvm.fma.v{vt.count}f64", vt, [vt] * 3), list(args))

    return a(a, b, c), codegen


@intrinsic
def v_round_f4(typingctx, a):
    """``float64(float32(a))``, lane by lane."""
    if not _is_f8_vector(a):
        return None

    def codegen(context, builder, sig, args):
        vt = _vty(sig.args[0])
        return builder.fpext(builder.fptrunc(args[0], ir.VectorType(ir.FloatType(), vt.count)), vt)

    return a(a), codegen


def _v_compare(op, doc):
    @intrinsic
    def cmp(typingctx, a, b):
        if not _is_f8_vector(a, b):
            return None

        def codegen(context, builder, sig, args):
            m = builder.fcmp_ordered(op, args[0], args[1])
            return builder.zext(builder.bitcast(m, ir.IntType(sig.args[0].n)), ir.IntType(64))

        return types.int64(a, b), codegen

    cmp.__doc__ = doc
    return cmp


v_gt = _v_compare(">", "Bit mask of the lanes where a > b (False where NaN)")
v_lt = _v_compare("<", "Bit mask of the lanes where a < b (False where NaN)")
v_le = _v_compare("<=", "Bit mask of the lanes where a <= b (False where NaN)")
v_eq = _v_compare("==", "Bit mask of the lanes where a == b (False where NaN)")


@intrinsic
def v_select(typingctx, m, a, b):
    """Lane i: ``a[i]`` where bit i of the integer ``m`` is set, else ``b[i]``."""
    if not (isinstance(m, types.Integer) and _is_f8_vector(a, b)):
        return None

    def codegen(context, builder, sig, args):
        n = sig.args[1].n
        mi = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int64), ir.IntType(n))
        return builder.select(builder.bitcast(mi, ir.VectorType(ir.IntType(1), n)), args[1], args[2])

    return a(m, a, b), codegen


def _v_reduce(op, doc):
    @intrinsic
    def red(typingctx, v):
        if not _is_f8_vector(v):
            return None

        def codegen(context, builder, sig, args):
            x = args[0]
            n = sig.args[0].n
            s = 1
            while s < n:  # butterfly: the result in every lane
                idx = ir.Constant(ir.VectorType(ir.IntType(32), n), [i ^ s for i in range(n)])
                other = builder.shuffle_vector(x, x, idx)
                x = builder.select(builder.fcmp_ordered(op, other, x), other, x)
                s *= 2
            return x

        return v(v), codegen

    red.__doc__ = doc
    return red


v_max = _v_reduce(">", "The largest lane, in every lane (no NaN lanes)")
v_min = _v_reduce("<", "The smallest lane, in every lane (no NaN lanes)")


def _transpose8x8(builder, rows):
    """The 8 x 8 matrix of 8 <8 x double> rows, transposed (a list of rows)."""
    mty = ir.VectorType(ir.IntType(32), 8)
    s = 1
    while s < 8:  # butterfly: swap the off-diagonal s x s blocks
        new = list(rows)
        for r in range(8):
            if r & s:
                continue
            lo = [ln if not ln & s else ln - s + 8 for ln in range(8)]
            hi = [ln + s if not ln & s else ln + 8 for ln in range(8)]
            new[r] = builder.shuffle_vector(rows[r], rows[r + s], ir.Constant(mty, lo))
            new[r + s] = builder.shuffle_vector(rows[r], rows[r + s], ir.Constant(mty, hi))
        rows = new
        s *= 2
    return rows


def _v_permuter(load_at, store_at, doc):
    """An intrinsic ``(arr, i)`` that loads the 8-lane rows at ``arr[i + load_at[r]]``,
    transposes each group of 8 and stores the rows to ``arr[i + store_at[r]]``, in place."""

    @intrinsic
    def permute(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.float64):
            return None

        def codegen(context, builder, sig, args):
            p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])

            def ptr(off):
                q = builder.gep(p, [ir.Constant(ir.IntType(64), off)])
                return builder.bitcast(q, _V8.as_pointer())

            rows = [builder.load(ptr(off), align=8) for off in load_at]
            out = []
            for g in range(0, len(rows), 8):
                out += _transpose8x8(builder, rows[g:g + 8])
            for off, row in zip(store_at, out):
                builder.store(row, ptr(off), align=8)
            return context.get_dummy_value()

        return types.none(arr, types.intp), codegen

    permute.__doc__ = doc
    return permute


v_transpose = _v_permuter(range(0, 64, 8), range(0, 64, 8),
                           "Transpose the 8 x 8 row-major block ``arr[i:i + 64]`` in place.")
# a block of 8 pixels x 16 variables: rows 0-7 and 8-15 of the variable-
# major form become lanes 0-7 and 8-15 of each pixel's row of 16
v_transpose16x8 = _v_permuter(
    range(0, 128, 8), [16 * p for p in range(8)] + [16 * p + 8 for p in range(8)],
    "``arr[i:i + 128]``, 16 rows of 8 (row r at 8 r), in place as 8 rows of 16 (row p at 16 p).")
v_transpose8x16 = _v_permuter(
    [16 * p for p in range(8)] + [16 * p + 8 for p in range(8)], range(0, 128, 8),
    "The inverse of ``v_transpose16x8``.")


@intrinsic
def ctz(typingctx, x):
    """Index of the lowest set bit of ``x`` (64 for 0)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int64)
        fn = _llvm_fn(builder, "llvm.cttz.i64", ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        return builder.call(fn, [v, ir.Constant(ir.IntType(1), 0)])

    return types.int64(x), codegen
