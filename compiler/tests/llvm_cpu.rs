//! The LLVM CPU back end against the kernel IR's reference executor: hand-built kernels
//! are compiled for `native`, x86-64-v3 and (where the host runs it) x86-64-v4, linked
//! into a shared object, loaded, run over sub-ranges, and compared element by element
//! with `kernel::exec::run` on the same inputs.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use tnc_compiler::backend::{self, CpuTarget};
use tnc_compiler::kernel::exec::{self, Buffer};
use tnc_compiler::kernel::*;

// ---- building kernels by hand ----

fn v(n: u32) -> Var {
    Var(n)
}
fn var(n: u32) -> Expr {
    Expr::Var(Var(n))
}
fn f(x: f32) -> Expr {
    Expr::F32(x)
}
fn i(x: i64) -> Expr {
    Expr::I64(x)
}
fn size(i: usize) -> Expr {
    Expr::Size(i)
}
fn ld(buffer: usize, index: Expr) -> Expr {
    Expr::Load { buffer, index: Box::new(index) }
}
fn lda(array: u32, index: Expr) -> Expr {
    Expr::LoadArray { array: Var(array), index: Box::new(index) }
}
fn un(op: Unary, a: Expr) -> Expr {
    Expr::Unary(op, Box::new(a))
}
fn bin(op: Binary, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}
fn add(a: Expr, b: Expr) -> Expr {
    bin(Binary::Add, a, b)
}
fn mul(a: Expr, b: Expr) -> Expr {
    bin(Binary::Mul, a, b)
}
fn sel(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}
fn cast(s: Scalar, a: Expr) -> Expr {
    Expr::Cast(s, Box::new(a))
}
fn store(buffer: usize, index: Expr, value: Expr) -> Stmt {
    Stmt::Store { buffer, index, value }
}
fn for_(var: u32, extent: Expr, kind: LoopKind, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var: Var(var), extent, kind, body }
}
fn let_(var: u32, value: Expr) -> Stmt {
    Stmt::Let { var: Var(var), value }
}
fn buf(name: &str, elem: Elem, access: Access) -> BufferDecl {
    BufferDecl { name: name.into(), elem, access }
}

fn kernel(
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
    }
}

// ---- test data ----

fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| (tnc_runtime::rng::normal(seed, 1, i as u64, 0) * 3.0) as f32).collect()
}

// ---- compiling, loading, comparing ----

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Lib {
    lib: libloading::Library,
    dir: PathBuf,
}

impl Drop for Lib {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type KernelFn = unsafe extern "C" fn(*const *mut c_void, *const i64, i64, i64);

fn compile(kernels: &[Kernel], target: &CpuTarget) -> Lib {
    let obj = backend::emit_object(kernels, target).unwrap_or_else(|e| panic!("{}: {e}", target.name));
    let dir = std::env::temp_dir().join(format!(
        "tnc-llvm-cpu-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let o = dir.join("kernels.o");
    std::fs::write(&o, obj).unwrap();
    let so = dir.join("kernels.so");
    backend::link_shared(&[o], &so).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    Lib { lib, dir }
}

/// Targets to run on this host: native, x86-64-v3 and x86-64-v4 where supported.
fn targets() -> Vec<CpuTarget> {
    let all = ["native", "x86-64-v3", "x86-64-v4"].map(|n| CpuTarget::parse(n).unwrap());
    let run: Vec<CpuTarget> = all.into_iter().filter(|t| t.host_supports()).collect();
    assert!(run.iter().any(|t| t.name == "native"), "native must run on its host");
    run
}

/// Prefill for output buffers: the generated code's copy gets NaN (or another marker) and
/// the executor's a different marker, so an element only one of them writes fails.
fn prefill(b: &Buffer, native: bool) -> Buffer {
    match b {
        Buffer::F32(v) => Buffer::F32(vec![if native { f32::NAN } else { -7777.0 }; v.len()]),
        Buffer::I32(v) => Buffer::I32(vec![if native { i32::MIN } else { i32::MIN + 1 }; v.len()]),
        Buffer::U8(v) => Buffer::U8(vec![if native { 0xAA } else { 0xBB }; v.len()]),
    }
}

fn ptr(b: &mut Buffer) -> *mut c_void {
    match b {
        Buffer::F32(v) => v.as_mut_ptr().cast(),
        Buffer::I32(v) => v.as_mut_ptr().cast(),
        Buffer::U8(v) => v.as_mut_ptr().cast(),
    }
}

/// Run `k` from `lib` over 0..split then split..n, the executor over 0..n, and compare.
/// `tol` is the largest relative error allowed for f32 results (0: bitwise equal).
fn check(lib: &Lib, target: &str, k: &Kernel, inputs: &[Buffer], sizes: &[i64], n: i64, tol: f32) {
    let mut expect: Vec<Buffer> = inputs
        .iter()
        .zip(&k.buffers)
        .map(|(b, d)| if d.access == Access::Write { prefill(b, false) } else { b.clone() })
        .collect();
    let mut got: Vec<Buffer> = inputs
        .iter()
        .zip(&k.buffers)
        .map(|(b, d)| if d.access == Access::Write { prefill(b, true) } else { b.clone() })
        .collect();
    exec::run(k, &mut expect, sizes, 0, n).unwrap();
    let f: libloading::Symbol<KernelFn> = unsafe { lib.lib.get(k.name.as_bytes()) }.unwrap();
    let ptrs: Vec<*mut c_void> = got.iter_mut().map(ptr).collect();
    for (b, e) in [(0, n / 3), (n / 3, n / 3), (n / 3, n)] {
        unsafe { f(ptrs.as_ptr(), sizes.as_ptr(), b, e) };
    }
    for (bi, (g, e)) in got.iter().zip(&expect).enumerate() {
        let name = &k.buffers[bi].name;
        match (g, e) {
            (Buffer::F32(g), Buffer::F32(e)) => {
                for (j, (&a, &b)) in g.iter().zip(e).enumerate() {
                    let ok = if a.is_nan() || b.is_nan() {
                        a.is_nan() && b.is_nan()
                    } else if tol == 0.0 || a.is_infinite() || b.is_infinite() {
                        a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0)
                    } else {
                        (a - b).abs() <= tol * b.abs().max(1e-30)
                    };
                    assert!(ok, "{target}: kernel `{}` {name}[{j}]: generated {a:e}, executor {b:e}", k.name);
                }
            }
            (g, e) => assert_eq!(g, e, "{target}: kernel `{}` buffer {name}", k.name),
        }
    }
}

// ---- kernels ----

/// out[r, d] = x[r, d] * w[d] + bias[r % N] over rows r in 0..B*N: broadcasting index math.
fn broadcast_kernel() -> Kernel {
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

const MATH: [Unary; 11] = [
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
fn math_kernel() -> Kernel {
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
const MATH_ROWS: usize = 23;

/// Row mean and max with accumulators.
fn reduce_kernel() -> Kernel {
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

/// A loop with `If`, an i32 counter, a u8 flag, and a guarded load (`Select`).
fn branch_kernel() -> Kernel {
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
fn cast_kernel() -> Kernel {
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
const CAST_INTS: usize = 15;
const CAST_FLOATS: usize = 4;
const CAST_BOOLS: usize = 8;

fn sub_i(a: Expr, b: Expr) -> Expr {
    bin(Binary::Sub, a, b)
}

/// Local arrays of f32, bool and i64: zero-initialized, written and read back.
fn array_kernel() -> Kernel {
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
fn dropout_kernel() -> Kernel {
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

// ---- tests ----

#[test]
fn kernels_match_the_executor() {
    let kernels = [
        broadcast_kernel(),
        math_kernel(),
        reduce_kernel(),
        branch_kernel(),
        cast_kernel(),
        array_kernel(),
        dropout_kernel(),
    ];
    for target in targets() {
        let lib = compile(&kernels, &target);
        let t = target.name.as_str();

        // broadcast: B=3, N=5, D=37 (a vector loop with a remainder).
        let (b, n, d) = (3usize, 5usize, 37usize);
        let inputs = [
            Buffer::F32(data(b * n * d, 1)),
            Buffer::F32(data(d, 2)),
            Buffer::F32(data(n, 3)),
            Buffer::F32(vec![0.0; b * n * d]),
        ];
        check(&lib, t, &kernels[0], &inputs, &[b as i64, n as i64, d as i64], (b * n) as i64, 0.0);

        // math, with special values among the inputs.
        let mut x = data(203, 4);
        x[..8].copy_from_slice(&[0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, 88.0, -100.0]);
        let n = x.len();
        let inputs = [Buffer::F32(x), Buffer::F32(vec![0.0; n * MATH_ROWS])];
        check(&lib, t, &kernels[1], &inputs, &[n as i64], n as i64, 1e-5);

        // reduce: 19 rows of 101.
        let (r, c) = (19usize, 101usize);
        let mut x = data(r * c, 5);
        x[3 * c + 7] = f32::NAN;
        let inputs = [Buffer::F32(x), Buffer::F32(vec![0.0; r]), Buffer::F32(vec![0.0; r])];
        check(&lib, t, &kernels[2], &inputs, &[r as i64, c as i64], r as i64, 0.0);

        // branch
        let r = 41usize;
        let inputs = [
            Buffer::F32(data(r * 4, 6)),
            Buffer::F32(data(r * 4, 7)),
            Buffer::I32(vec![0; r]),
            Buffer::U8(vec![0; r]),
            Buffer::F32(vec![0.0; r]),
        ];
        check(&lib, t, &kernels[3], &inputs, &[r as i64], r as i64, 0.0);

        // casts
        let mut a: Vec<i32> = (0..64).map(|j| (j * 7919 - 200_000) * if j % 3 == 0 { 1000 } else { 1 }).collect();
        a[..4].copy_from_slice(&[i32::MIN, i32::MAX, 0, -1]);
        let mut x = data(64, 8).into_iter().map(|v| v * 1e3).collect::<Vec<_>>();
        x[..6].copy_from_slice(&[f32::NAN, 3e9, -3e9, f32::INFINITY, -0.0, 1e19]);
        let m: Vec<u8> = (0..64).map(|j| (j % 3 == 1) as u8).collect();
        let inputs = [
            Buffer::I32(a),
            Buffer::F32(x),
            Buffer::U8(m),
            Buffer::I32(vec![0; 64 * CAST_INTS]),
            Buffer::F32(vec![0.0; 64 * CAST_FLOATS]),
            Buffer::U8(vec![0; 64 * CAST_BOOLS]),
        ];
        check(&lib, t, &kernels[4], &inputs, &[64], 64, 0.0);

        // arrays
        let r = 23usize;
        let inputs = [Buffer::F32(data(r * 8, 9)), Buffer::F32(vec![0.0; r]), Buffer::F32(vec![0.0; r])];
        check(&lib, t, &kernels[5], &inputs, &[r as i64], r as i64, 0.0);

        // dropout: seed with the high bit set, a step beyond 2^32.
        let n = 1000usize;
        let inputs = [Buffer::F32(data(n, 10)), Buffer::F32(vec![0.0; n]), Buffer::U8(vec![0; 4 * n])];
        let sizes = [n as i64, 0xDEAD_BEEF_1234_5678u64 as i64, (1i64 << 32) + 17];
        check(&lib, t, &kernels[6], &inputs, &sizes, n as i64, 0.0);
    }
}

#[test]
fn dropout_matches_runtime_rng() {
    // Directly against tnc_runtime::rng, not only through the executor.
    let k = dropout_kernel();
    let target = CpuTarget::parse("native").unwrap();
    let lib = compile(std::slice::from_ref(&k), &target);
    let f: libloading::Symbol<KernelFn> = unsafe { lib.lib.get(b"dropout") }.unwrap();
    let n = 4096usize;
    let (seed, step) = (42u64, 3i64);
    let x = vec![1.0f32; n];
    let mut y = vec![0.0f32; n];
    let mut mask = vec![0u8; 4 * n];
    let ptrs: [*mut c_void; 3] = [x.as_ptr() as *mut c_void, y.as_mut_ptr().cast(), mask.as_mut_ptr().cast()];
    let sizes = [n as i64, seed as i64, step];
    unsafe { f(ptrs.as_ptr(), sizes.as_ptr(), 0, n as i64) };
    for j in 0..n {
        let keep = tnc_runtime::rng::dropout_keep(seed, 0x1234_5678_9abc, j as u64, step as u64, 0.3);
        assert_eq!(mask[4 * j] != 0, keep, "element {j}");
    }
    let kept = mask.iter().step_by(4).filter(|&&m| m != 0).count() as f64 / n as f64;
    assert!((kept - 0.7).abs() < 0.03, "kept {kept}");
}

#[test]
fn invalid_kernels_are_errors() {
    let target = CpuTarget::parse("x86-64-v3").unwrap();
    let bad = |body: Vec<Stmt>| {
        kernel(
            "bad",
            vec![buf("x", Elem::F32, Access::Read), buf("o", Elem::I32, Access::Write)],
            &["n"],
            &[],
            size(0),
            body,
        )
    };
    let cases = [
        (bad(vec![store(1, var(0), ld(0, var(0)))]), "stored into `o` must be an integer"),
        (bad(vec![store(1, var(0), var(9))]), "v9 is used before it is defined"),
        (bad(vec![store(0, f(1.0), f(1.0))]), "index of `x` must be an integer"),
        (bad(vec![store(2, var(0), i(1))]), "buffer 2 is not declared"),
        (bad(vec![store(1, var(0), size(3))]), "size argument 3"),
        (bad(vec![store(1, var(0), add(i(1), f(1.0)))]), "Add of an integer and f32"),
        (bad(vec![Stmt::If { cond: i(1), then: vec![], otherwise: vec![] }]), "`if` condition must be bool"),
        (bad(vec![let_(1, f(1.0)), let_(1, i(1))]), "v1 is redefined"),
        (bad(vec![store(1, var(0), un(Unary::Exp, i(1)))]), "Exp of an integer"),
    ];
    for (k, msg) in cases {
        let e = backend::emit_object(std::slice::from_ref(&k), &target).unwrap_err();
        assert!(e.contains(msg), "expected `{msg}` in: {e}");
        assert!(backend::emit_llvm_ir(std::slice::from_ref(&k), &target, false).is_err());
    }
    // Two kernels with one name.
    let k = broadcast_kernel();
    let e = backend::emit_object(&[k.clone(), k], &target).unwrap_err();
    assert!(e.contains("already in the module"), "{e}");
}

#[test]
fn unknown_target_lists_valid_ones() {
    let e = CpuTarget::parse("skylake").unwrap_err();
    assert!(
        e.contains("`skylake`") && e.contains("native") && e.contains("x86-64-v3") && e.contains("x86-64-v4"),
        "{e}"
    );
}

#[test]
fn v4_uses_zmm_registers() {
    // out[i] = x[i] * 2 + y[i] over the parallel index.
    let k = kernel(
        "axpy",
        vec![
            buf("x", Elem::F32, Access::Read),
            buf("y", Elem::F32, Access::Read),
            buf("out", Elem::F32, Access::Write),
        ],
        &["n"],
        &[],
        size(0),
        vec![store(2, var(0), add(mul(ld(0, var(0)), f(2.0)), ld(1, var(0))))],
    );
    let v4 = CpuTarget::parse("x86-64-v4").unwrap();
    let asm = backend::emit_asm(std::slice::from_ref(&k), &v4).unwrap();
    assert!(asm.contains("zmm"), "no zmm registers for x86-64-v4:\n{asm}");
    let v3 = CpuTarget::parse("x86-64-v3").unwrap();
    let asm = backend::emit_asm(std::slice::from_ref(&k), &v3).unwrap();
    assert!(asm.contains("ymm") && !asm.contains("zmm"), "x86-64-v3 must use ymm only:\n{asm}");
    if v4.host_supports() {
        let lib = compile(std::slice::from_ref(&k), &v4);
        let n = 1001;
        let inputs = [Buffer::F32(data(n, 11)), Buffer::F32(data(n, 12)), Buffer::F32(vec![0.0; n])];
        check(&lib, "x86-64-v4", &k, &inputs, &[n as i64], n as i64, 0.0);
    }
}

#[test]
fn ir_has_attributes_and_loop_hints() {
    let v4 = CpuTarget::parse("x86-64-v4").unwrap();
    let ir = backend::emit_llvm_ir(&[broadcast_kernel()], &v4, false).unwrap();
    for s in [
        "define void @broadcast(ptr nocapture readonly %buffers, ptr nocapture readonly %sizes, i64 %begin, i64 %end)",
        "\"target-cpu\"=\"x86-64-v4\"",
        "\"prefer-vector-width\"=\"512\"",
        "+avx512f",
        "llvm.loop.vectorize.enable",
    ] {
        assert!(ir.contains(s), "missing `{s}` in:\n{ir}");
    }
    let ir = backend::emit_llvm_ir(&[math_kernel()], &v4, true).unwrap();
    assert!(ir.contains("@tanhf") && ir.contains("@llvm.maximum.") && ir.contains("@llvm.minimum."), "{ir}");
}

#[test]
fn identical_kernels_are_emitted_once() {
    let a = broadcast_kernel();
    let b = Kernel { name: "broadcast_layer2".into(), ..a.clone() };
    let c = reduce_kernel();
    let d = backend::dedup_kernels(&[a, c, b]).unwrap();
    assert_eq!(d.kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["broadcast", "reduce"]);
    assert_eq!(d.names["broadcast_layer2"], "broadcast");
    assert_eq!(d.names["broadcast"], "broadcast");
    assert_eq!(d.names["reduce"], "reduce");
    let e = backend::dedup_kernels(&[broadcast_kernel(), Kernel { name: "broadcast".into(), ..reduce_kernel() }]);
    assert!(e.is_err());
}

#[test]
fn missing_linker_is_a_clear_error() {
    // Run `link_shared` with CC pointing nowhere, in a child process so the environment
    // of other tests is untouched.
    if std::env::var("TNC_TEST_MISSING_CC").is_ok() {
        let e = backend::link_shared(&[PathBuf::from("x.o")], &std::env::temp_dir().join("never.so")).unwrap_err();
        assert!(e.contains("was not found") && e.contains("tnc-no-such-cc"), "{e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "missing_linker_is_a_clear_error", "--nocapture"])
        .env("TNC_TEST_MISSING_CC", "1")
        .env("CC", "tnc-no-such-cc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
