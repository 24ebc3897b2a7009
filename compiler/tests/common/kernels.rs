//! Kernels built by hand in the kernel IR, shared by the back-end tests (`cpu_backends.rs`
//! runs them natively, `ptx.rs` assembles them for GPUs): broadcasting index math, every
//! math function, reductions, branches, casts, local arrays and dropout.

use tnc_compiler::kernel::*;

// ---- building kernels by hand ----

pub fn v(n: u32) -> Var {
    Var(n)
}
pub fn var(n: u32) -> Expr {
    Expr::Var(Var(n))
}
pub fn f(x: f32) -> Expr {
    Expr::F32(x)
}
pub fn i(x: i64) -> Expr {
    Expr::I64(x)
}
pub fn size(i: usize) -> Expr {
    Expr::Size(i)
}
pub fn ld(buffer: usize, index: Expr) -> Expr {
    Expr::Load { buffer, index: Box::new(index) }
}
pub fn lda(array: u32, index: Expr) -> Expr {
    Expr::LoadArray { array: Var(array), index: Box::new(index) }
}
pub fn un(op: Unary, a: Expr) -> Expr {
    Expr::Unary(op, Box::new(a))
}
pub fn bin(op: Binary, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}
pub fn add(a: Expr, b: Expr) -> Expr {
    bin(Binary::Add, a, b)
}
pub fn mul(a: Expr, b: Expr) -> Expr {
    bin(Binary::Mul, a, b)
}
pub fn sel(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}
pub fn cast(s: Scalar, a: Expr) -> Expr {
    Expr::Cast(s, Box::new(a))
}
pub fn store(buffer: usize, index: Expr, value: Expr) -> Stmt {
    Stmt::Store { buffer, index, value }
}
pub fn for_(var: u32, extent: Expr, kind: LoopKind, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var: Var(var), extent, kind, body }
}
pub fn let_(var: u32, value: Expr) -> Stmt {
    Stmt::Let { var: Var(var), value }
}
pub fn buf(name: &str, elem: Elem, access: Access) -> BufferDecl {
    BufferDecl { name: name.into(), elem, access }
}

pub fn kernel(
    name: &str,
    buffers: Vec<BufferDecl>,
    sizes: &[&str],
    scalars: &[&str],
    extent: Expr,
    body: Vec<Stmt>,
) -> Kernel {
    Kernel {
        name: name.into(),
        buffers,
        sizes: sizes.iter().map(|s| s.to_string()).collect(),
        scalars: scalars.iter().map(|s| s.to_string()).collect(),
        index: Var(0),
        extent,
        body,
        gemm: None,
        threads: None,
    }
}

// ---- kernels ----

/// out[r, d] = x[r, d] * w[d] + bias[r % N] over rows r in 0..B*N: broadcasting index math.
pub fn broadcast_kernel() -> Kernel {
    let (r, d) = (0, 1);
    let at = add(mul(var(r), size(2)), var(d));
    kernel(
        "broadcast",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("w", Elem::F32, Access::Read),
            buf("bias", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
        ],
        &["B", "N", "D"],
        &[],
        mul(size(0), size(1)),
        vec![for_(
            d,
            size(2),
            LoopKind::Vector,
            vec![store(3, at.clone(), add(mul(ld(0, at), ld(1, var(d))), ld(2, bin(Binary::Rem, var(r), size(1)))))],
        )],
    )
}

pub const MATH: [Unary; 11] = [
    Unary::Neg,
    Unary::Exp,
    Unary::Log,
    Unary::Sqrt,
    Unary::Rsqrt,
    Unary::Recip,
    Unary::Abs,
    Unary::Tanh,
    Unary::Sin,
    Unary::Cos,
    Unary::Neg,
];

/// One output row per math function: unary functions (on x, |x| for log and roots), then
/// pow, max, min (NaN-propagating), float remainder and the comparisons as 0/1.
pub fn math_kernel() -> Kernel {
    let x = || ld(0, var(0));
    let n = || size(0);
    let mut body = vec![];
    let mut row = 0i64;
    let mut out = |value: Expr, body: &mut Vec<Stmt>| {
        body.push(store(1, add(mul(i(row), n()), var(0)), value));
        row += 1;
    };
    for op in MATH {
        let arg = match op {
            Unary::Log | Unary::Sqrt | Unary::Rsqrt => un(Unary::Abs, x()),
            _ => x(),
        };
        out(un(op, arg), &mut body);
    }
    out(bin(Binary::Pow, un(Unary::Abs, x()), f(1.7)), &mut body);
    out(bin(Binary::Pow, x(), f(3.0)), &mut body);
    out(bin(Binary::Max, x(), ld(0, bin(Binary::Rem, add(var(0), i(1)), n()))), &mut body);
    out(bin(Binary::Min, x(), ld(0, bin(Binary::Rem, add(var(0), i(1)), n()))), &mut body);
    out(bin(Binary::Rem, x(), f(1.3)), &mut body);
    out(bin(Binary::Sub, bin(Binary::Div, x(), f(3.0)), f(0.25)), &mut body);
    for op in [Binary::Lt, Binary::Le, Binary::Gt, Binary::Ge, Binary::Eq, Binary::Ne] {
        out(cast(Scalar::F32, bin(op, x(), ld(0, bin(Binary::Rem, add(var(0), i(1)), n())))), &mut body);
    }
    kernel(
        "math",
        vec![buf("x", Elem::F32, Access::Read), buf("out", Elem::F32, Access::Write)],
        &["n"],
        &[],
        size(0),
        body,
    )
}
pub const MATH_ROWS: usize = 23;

/// Row mean and max with accumulators.
pub fn reduce_kernel() -> Kernel {
    let (r, j, acc, m) = (0, 1, 2, 3);
    let x = || ld(0, add(mul(var(r), size(1)), var(j)));
    kernel(
        "reduce",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("mean", Elem::F32, Access::Write),
            buf("max", Elem::F32, Access::Write),
        ],
        &["R", "C"],
        &[],
        size(0),
        vec![
            Stmt::Mut { var: v(acc), ty: Scalar::F32, init: f(0.0) },
            Stmt::Mut { var: v(m), ty: Scalar::F32, init: f(f32::NEG_INFINITY) },
            for_(
                j,
                size(1),
                LoopKind::Serial,
                vec![
                    Stmt::Assign { var: v(acc), value: add(var(acc), x()) },
                    Stmt::Assign { var: v(m), value: bin(Binary::Max, var(m), x()) },
                ],
            ),
            store(1, var(r), bin(Binary::Div, var(acc), cast(Scalar::F32, size(1)))),
            store(2, var(r), var(m)),
        ],
    )
}

/// Row sums, compensated (Kahan, as the schedules emit them), of `exp(x)`; the sum of the
/// row before it is carried in (`init`), so the accumulator does not start from 0.
pub fn kahan_kernel() -> Kernel {
    let (r, j, s, c, y, t) = (0, 1, 2, 3, 4, 5);
    let x = ld(0, add(mul(var(r), size(1)), var(j)));
    let sub = |a, b| bin(Binary::Sub, a, b);
    kernel(
        "kahan",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("init", Elem::F32, Access::Read),
            buf("sum", Elem::F32, Access::Write),
        ],
        &["R", "C"],
        &[],
        size(0),
        vec![
            Stmt::Mut { var: v(s), ty: Scalar::F32, init: f(0.0) },
            Stmt::Mut { var: v(c), ty: Scalar::F32, init: f(0.0) },
            Stmt::Assign { var: v(s), value: ld(1, var(r)) },
            for_(
                j,
                size(1),
                LoopKind::Serial,
                vec![
                    let_(y, sub(un(Unary::Exp, x), var(c))),
                    let_(t, add(var(s), var(y))),
                    Stmt::Assign { var: v(c), value: sub(sub(var(t), var(s)), var(y)) },
                    Stmt::Assign { var: v(s), value: var(t) },
                ],
            ),
            store(2, var(r), var(s)),
        ],
    )
}

/// 16-bit floats: f32 values stored to bf16 and f16 buffers (rounded), rounded in
/// registers (`RoundBf16`, `RoundF16`), and a bf16 buffer loaded (widened).
pub fn sixteen_bit_kernel() -> Kernel {
    let r = 0;
    let x = || ld(0, var(r));
    let round = |op, v| un(op, v);
    kernel(
        "sixteen",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("b", Elem::BF16, Access::Read),
            buf("a", Elem::BF16, Access::Write),
            buf("h", Elem::F16, Access::Write),
            buf("y", Elem::F32, Access::Write),
        ],
        &["R"],
        &[],
        size(0),
        vec![
            store(2, var(r), x()),
            store(3, var(r), x()),
            store(4, var(r), add(add(round(Unary::RoundBf16, x()), round(Unary::RoundF16, x())), ld(1, var(r)))),
        ],
    )
}

/// A loop with `If`, an i32 counter, a u8 flag, and a guarded load (`Select`).
pub fn branch_kernel() -> Kernel {
    let (r, j, cnt) = (0, 1, 2);
    let at = || add(mul(var(r), i(4)), var(j));
    kernel(
        "branch",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("y", Elem::F32, Access::ReadWrite),
            buf("count", Elem::I32, Access::Write),
            buf("many", Elem::U8, Access::Write),
            buf("next", Elem::F32, Access::Write),
        ],
        &["R"],
        &[],
        size(0),
        vec![
            Stmt::Mut { var: v(cnt), ty: Scalar::I32, init: i(0) },
            for_(
                j,
                i(4),
                LoopKind::Serial,
                vec![Stmt::If {
                    cond: bin(Binary::Gt, ld(0, at()), f(0.0)),
                    then: vec![Stmt::Assign { var: v(cnt), value: add(var(cnt), i(1)) }, store(1, at(), ld(0, at()))],
                    otherwise: vec![Stmt::If {
                        cond: bin(Binary::Lt, ld(0, at()), f(-2.0)),
                        then: vec![store(1, at(), mul(ld(0, at()), f(0.1)))],
                        otherwise: vec![],
                    }],
                }],
            ),
            store(2, var(r), var(cnt)),
            store(3, var(r), bin(Binary::Gt, var(cnt), i(2))),
            // The load is out of bounds where the condition is false: it must not run.
            store(
                4,
                var(r),
                sel(bin(Binary::Lt, add(var(r), i(1)), size(0)), ld(0, mul(add(var(r), i(1)), i(4))), f(-1.0)),
            ),
        ],
    )
}

/// Casts and integer arithmetic over i32, u8 and f32 buffers.
pub fn cast_kernel() -> Kernel {
    let a = || ld(0, var(0)); // i32
    let x = || ld(1, var(0)); // f32
    let m = || ld(2, var(0)); // u8
    let ints = vec![
        cast(Scalar::I32, x()),
        cast(Scalar::I32, mul(a(), i(3_000_000_017))),
        cast(Scalar::I32, cast(Scalar::I64, x())),
        bin(Binary::Div, a(), i(7)),
        bin(Binary::Rem, a(), i(7)),
        un(Unary::Abs, a()),
        un(Unary::Neg, a()),
        bin(Binary::Max, a(), i(5)),
        bin(Binary::Min, a(), i(-5)),
        cast(Scalar::I32, bin(Binary::Pow, a(), i(3))),
        cast(Scalar::I32, bin(Binary::Pow, i(3), bin(Binary::Rem, un(Unary::Abs, a()), i(50)))),
        bin(Binary::Pow, a(), i(-2)),
        cast(Scalar::I32, m()),
        cast(Scalar::I64, bin(Binary::Ge, a(), i(0))),
        sel(bin(Binary::Lt, a(), i(0)), sub_i(i(0), a()), a()),
    ];
    let floats = vec![
        cast(Scalar::F32, a()),
        cast(Scalar::F32, m()),
        cast(Scalar::F32, mul(mul(a(), a()), mul(a(), i(12_345)))),
        cast(Scalar::F32, cast(Scalar::I32, x())),
    ];
    let bools = vec![
        cast(Scalar::Bool, x()),
        cast(Scalar::Bool, a()),
        bin(Binary::And, m(), bin(Binary::Gt, x(), f(0.0))),
        bin(Binary::Or, un(Unary::Not, m()), bin(Binary::Eq, a(), i(0))),
        bin(Binary::Ne, x(), x()),
        bin(Binary::Eq, m(), bin(Binary::Lt, a(), i(0))),
        bin(Binary::Ne, m(), bin(Binary::Lt, a(), i(0))),
        cast(Scalar::Bool, f(0.5)),
    ];
    let mut body = vec![];
    for (out, vals) in [(3usize, ints), (4, floats), (5, bools)] {
        let k = vals.len() as i64;
        for (j, e) in vals.into_iter().enumerate() {
            body.push(store(out, add(mul(var(0), i(k)), i(j as i64)), e));
        }
    }
    kernel(
        "casts",
        vec![
            buf("a", Elem::I32, Access::Read),
            buf("x", Elem::F32, Access::Read),
            buf("m", Elem::U8, Access::Read),
            buf("oi", Elem::I32, Access::Write),
            buf("of", Elem::F32, Access::Write),
            buf("ob", Elem::U8, Access::Write),
        ],
        &["n"],
        &[],
        size(0),
        body,
    )
}
pub const CAST_INTS: usize = 15;
pub const CAST_FLOATS: usize = 4;
pub const CAST_BOOLS: usize = 8;

pub fn sub_i(a: Expr, b: Expr) -> Expr {
    bin(Binary::Sub, a, b)
}

/// Local arrays of f32, bool and i64: zero-initialized, written and read back.
pub fn array_kernel() -> Kernel {
    let (r, j, t, flags, ints, z, s) = (0, 1, 2, 3, 4, 5, 6);
    let x = || ld(0, add(mul(var(r), i(8)), var(j)));
    let rev = || sub_i(i(7), var(j));
    kernel(
        "arrays",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
            buf("zeros", Elem::F32, Access::Write),
        ],
        &["R"],
        &[],
        size(0),
        vec![
            Stmt::Array { var: v(t), elem: Scalar::F32, len: 8 },
            Stmt::Array { var: v(flags), elem: Scalar::Bool, len: 8 },
            Stmt::Array { var: v(ints), elem: Scalar::I64, len: 8 },
            Stmt::Array { var: v(z), elem: Scalar::F32, len: 4 },
            for_(
                j,
                i(8),
                LoopKind::Serial,
                vec![
                    Stmt::StoreArray { array: v(t), index: var(j), value: mul(x(), f(2.0)) },
                    Stmt::StoreArray { array: v(flags), index: var(j), value: bin(Binary::Gt, x(), f(0.0)) },
                    Stmt::StoreArray { array: v(ints), index: var(j), value: mul(var(j), var(j)) },
                ],
            ),
            Stmt::Mut { var: v(s), ty: Scalar::F32, init: f(0.0) },
            for_(
                j,
                i(8),
                LoopKind::Serial,
                vec![Stmt::Assign {
                    var: v(s),
                    value: add(
                        add(var(s), sel(lda(flags, rev()), lda(t, rev()), f(1.0))),
                        cast(Scalar::F32, lda(ints, var(j))),
                    ),
                }],
            ),
            store(1, var(r), var(s)),
            Stmt::StoreArray { array: v(z), index: i(1), value: ld(0, mul(var(r), i(8))) },
            store(2, var(r), add(add(lda(z, i(0)), lda(z, i(1))), add(lda(z, i(2)), lda(z, i(3))))),
        ],
    )
}

/// Dropout masks: rates 0.3, 0 and 1, an index beyond 2^32, seed and step from scalars.
pub fn dropout_kernel() -> Kernel {
    let keep = |salt: u64, index: Expr, rate: f64| Expr::DropoutKeep {
        seed: Box::new(size(1)),
        salt,
        index: Box::new(index),
        step: Box::new(size(2)),
        rate,
    };
    kernel(
        "dropout",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("y", Elem::F32, Access::Write),
            buf("mask", Elem::U8, Access::Write),
        ],
        &["n"],
        &["seed", "step"],
        size(0),
        vec![
            let_(1, keep(0x1234_5678_9abc, var(0), 0.3)),
            store(1, var(0), sel(var(1), bin(Binary::Div, ld(0, var(0)), f(0.7)), f(0.0))),
            store(2, mul(var(0), i(4)), var(1)),
            store(2, add(mul(var(0), i(4)), i(1)), keep(7, add(var(0), i(1 << 33)), 0.5)),
            store(2, add(mul(var(0), i(4)), i(2)), keep(7, var(0), 0.0)),
            store(2, add(mul(var(0), i(4)), i(3)), keep(7, var(0), 1.0)),
        ],
    )
}

// ---- block kernels (GPU schedules) ----

/// How [`block_row_sum`] is broken, for the GPU-semantics executor's checks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BlockBug {
    None,
    /// The barriers between the reduction's stages are left out (a race).
    NoBarriers,
    /// The shared array is twice as long and the second half is read unwritten.
    ReadsUnwritten,
    /// A barrier inside `if thread < 16` (not every thread reaches it).
    DivergentBarrier,
}

/// `out[r] = Σ_c x[r, c]` for rows of 64 columns: one block of 32 threads per row, each
/// thread adding two columns into a shared array, then a tree reduction with a barrier
/// after each stage.
pub fn block_row_sum(bug: BlockBug) -> Kernel {
    let (row, s) = (0u32, 10u32);
    let thread = || Expr::Thread;
    let len = if bug == BlockBug::ReadsUnwritten { 64 } else { 32 };
    let mut body = vec![
        Stmt::Shared { var: v(s), elem: Scalar::F32, len },
        let_(1, mul(var(row), i(64))),
        Stmt::StoreArray {
            array: v(s),
            index: thread(),
            value: add(ld(0, add(var(1), thread())), ld(0, add(var(1), add(thread(), i(32))))),
        },
        Stmt::Barrier,
    ];
    for stride in [16, 8, 4, 2, 1] {
        let partner = if bug == BlockBug::ReadsUnwritten && stride == 16 { 32 } else { stride };
        let mut then = vec![Stmt::StoreArray {
            array: v(s),
            index: thread(),
            value: add(lda(s, thread()), lda(s, add(thread(), i(partner)))),
        }];
        if bug == BlockBug::DivergentBarrier && stride == 16 {
            then.push(Stmt::Barrier);
        }
        body.push(Stmt::If { cond: bin(Binary::Lt, thread(), i(stride)), then, otherwise: vec![] });
        if bug != BlockBug::NoBarriers {
            body.push(Stmt::Barrier);
        }
    }
    body.push(Stmt::If {
        cond: bin(Binary::Eq, thread(), i(0)),
        then: vec![store(1, var(row), lda(s, i(0)))],
        otherwise: vec![],
    });
    let mut k = kernel(
        "block_row_sum",
        vec![buf("x", Elem::F32, Access::Read), buf("out", Elem::F32, Access::Write)],
        &["R"],
        &[],
        size(0),
        body,
    );
    k.threads = Some(32);
    k
}
