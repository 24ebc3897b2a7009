//! The GPU-semantics executor (`kernel/gpu_exec.rs`) on a hand-built block kernel: a row
//! sum by one block of 32 threads per row, with a shared array and a tree reduction. It
//! computes the sums, and each way of breaking it is reported: the missing barriers as a
//! race, an unwritten shared element, a barrier not every thread reaches.

mod common;
use common::kernels::*;
use tnc_compiler::kernel::exec::{run_all, Buffer};

const ROWS: usize = 5;

fn x() -> Vec<f32> {
    (0..ROWS * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect()
}

fn run(bug: BlockBug) -> Result<Vec<f32>, String> {
    let k = block_row_sum(bug);
    let mut buffers = vec![Buffer::F32(x()), Buffer::F32(vec![f32::NAN; ROWS])];
    run_all(&k, &mut buffers, &[ROWS as i64])?;
    let Buffer::F32(out) = &buffers[1] else { unreachable!() };
    Ok(out.clone())
}

#[test]
fn a_block_reduction_computes_row_sums() {
    let out = run(BlockBug::None).unwrap();
    let x = x();
    for (r, got) in out.iter().enumerate() {
        let want: f64 = x[r * 64..(r + 1) * 64].iter().map(|&v| v as f64).sum();
        assert!((*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "row {r}: {got} vs {want}");
    }
}

#[test]
fn a_missing_barrier_is_reported_as_a_race() {
    let e = run(BlockBug::NoBarriers).unwrap_err();
    assert!(e.contains("race") && e.contains("no barrier between") && e.contains("block 0"), "{e}");
}

#[test]
fn reading_unwritten_shared_memory_is_reported() {
    let e = run(BlockBug::ReadsUnwritten).unwrap_err();
    assert!(e.contains("no thread has written") && e.contains("uninitialized"), "{e}");
}

#[test]
fn a_barrier_not_every_thread_reaches_is_reported() {
    let e = run(BlockBug::DivergentBarrier).unwrap_err();
    assert!(e.contains("barrier") && e.contains("differs between threads"), "{e}");
}

/// The GEMM library nodes of the tile tests: sizes that are and are not multiples of the
/// tiles, row-major and transposed operands (the loads' two thread orders), a batch axis,
/// a run-time size `M`, and `C += A·B`; A and B of element type `elem`. Each comes with
/// its buffers and the size `M`.
mod gemms {
    use tnc_compiler::kernel::exec::Buffer;
    use tnc_compiler::kernel::gemm::{BatchAxis, Gemm, Matrix};
    use tnc_compiler::kernel::{math, Access, BufferDecl, Elem, Expr, Kernel, Var};

    pub struct Case {
        pub node: Kernel,
        pub buffers: Vec<Buffer>,
        pub m: i64,
        /// The largest k, for tolerances.
        pub k: i64,
    }

    pub fn cases(elem: Elem) -> Vec<Case> {
        let i = Expr::I64;
        let mul = |a: Expr, b: Expr| Expr::Binary(tnc_compiler::kernel::Binary::Mul, Box::new(a), Box::new(b));
        // (m, n, k, A transposed, B transposed, batch, accumulate); m is the size `M`.
        let shapes = [
            (64, 64, 16, false, false, 1, false),
            (70, 33, 37, false, false, 1, false),
            (5, 130, 3, true, false, 2, true),
            (129, 7, 40, false, true, 3, false),
            (1, 1, 0, false, false, 1, true),
            (31, 65, 17, true, true, 2, false),
            (17, 24, 70, false, false, 1, true),
        ];
        let mut out = Vec::new();
        for (ci, &(m, n, k, at, bt, batch, accumulate)) in shapes.iter().enumerate() {
            let msize = Expr::Size(0);
            // A: [batch, m, k] stored row-major or as [batch, k, m]; B likewise.
            let a = if at {
                Matrix { offset: i(3), rows: i(1), cols: msize.clone() }
            } else {
                Matrix { offset: i(3), rows: i(k), cols: i(1) }
            };
            let b = if bt {
                Matrix { offset: i(0), rows: i(1), cols: i(k) }
            } else {
                Matrix { offset: i(0), rows: i(n), cols: i(1) }
            };
            let c = Matrix { offset: i(1), rows: i(n), cols: i(1) };
            let g = Gemm {
                accumulate,
                batch: vec![BatchAxis { extent: i(batch), a: mul(msize.clone(), i(k)), b: i(k * n), c: i(m * n) }],
                m: msize,
                n: i(n),
                k: i(k),
                a,
                b,
                c,
            };
            let decl = |name: &str, elem, access| BufferDecl { name: name.into(), elem, access };
            let c_access = if accumulate { Access::ReadWrite } else { Access::Write };
            let node = Kernel {
                name: format!("gemm{ci}"),
                buffers: vec![
                    decl("a", elem, Access::Read),
                    decl("b", elem, Access::Read),
                    decl("c", Elem::F32, c_access),
                ],
                sizes: vec!["M".into()],
                scalars: vec![],
                index: Var(0),
                extent: i(batch * m),
                body: vec![],
                gemm: Some(g),
                threads: None,
            };
            // Values that are not 16-bit floats, so that the operands' rounding shows.
            let data = |len: i64, seed: i64| -> Vec<f32> {
                (0..len).map(|x| (((x * 7919 + seed * 104729) % 211) as f32 - 105.0) / 64.0 + 1e-3).collect()
            };
            let operand = |v: Vec<f32>| match elem {
                Elem::F32 => Buffer::F32(v),
                Elem::BF16 => Buffer::BF16(v.iter().map(|&x| math::bf16_bits(x)).collect()),
                Elem::F16 => Buffer::F16(v.iter().map(|&x| math::f16_bits(x)).collect()),
                other => panic!("no GEMM of {other:?}"),
            };
            let buffers = vec![
                operand(data(3 + batch * m * k, 1)),
                operand(data(batch * k * n, 2)),
                Buffer::F32(data(1 + batch * m * n + 2, 3)),
            ];
            out.push(Case { node, buffers, m, k });
        }
        out
    }

    /// C after running `k` on the case's buffers.
    pub fn run(k: &Kernel, case: &Case) -> Result<Vec<f32>, String> {
        let mut buffers = case.buffers.clone();
        tnc_compiler::kernel::exec::run_all(k, &mut buffers, &[case.m])?;
        let Buffer::F32(c) = &buffers[2] else { unreachable!("C is f32") };
        Ok(c.clone())
    }
}

/// f32 GEMM nodes tiled for GPUs (`kernel/gemm_tiles.rs`) against the same node run naively
/// by the reference executor. Within 1e-5 relative to each element's scale (the sums are
/// f32 in the same order; only the FMA contraction may differ).
#[test]
fn tiled_gemms_match_the_library_node() {
    use tnc_compiler::kernel::gemm_tiles::tile_gemm;
    for case in gemms::cases(tnc_compiler::kernel::Elem::F32) {
        let tiled = tile_gemm(&case.node);
        assert_eq!(tiled.threads, Some(256));
        let want = gemms::run(&case.node, &case).unwrap();
        let got = gemms::run(&tiled, &case).unwrap_or_else(|e| panic!("{}: {e}", case.node.name));
        let scale = (case.k as f32).max(1.0) * 3.0;
        for (x, (a, b)) in want.iter().zip(&got).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "{}: C[{x}] = {b}, want {a}", case.node.name);
        }
    }
}

/// bf16 and f16 GEMM nodes tiled onto tensor cores (`Stmt::Mma`, `kernel/mma.rs`): the
/// warp products, with every thread's fragments gathered as PTX lays them out, equal the
/// naive product of the same 16-bit operands exactly (both add each element's k terms in
/// order in f32), in the GPU-semantics executor and as the thread loops the emulated GPU
/// compiles. Sizes not multiples of 16 (m 70, n 33, k 37, …) exercise the zero padding.
#[test]
fn tensor_core_gemms_equal_the_library_node() {
    use tnc_compiler::kernel::gemm_tiles::tile_gemm;
    use tnc_compiler::kernel::{thread_loops::thread_loops, Elem};
    for elem in [Elem::BF16, Elem::F16] {
        for case in gemms::cases(elem) {
            let name = format!("{} {elem:?}", case.node.name);
            let tiled = tile_gemm(&case.node);
            assert_eq!(tiled.threads, Some(128), "{name}");
            let text = tnc_compiler::kernel::print::to_text(&tiled);
            assert_eq!(text.matches("mma.m16n8k16").count(), 8, "{name}: 8 products per step of 16\n{text}");
            let want = gemms::run(&case.node, &case).unwrap();
            let got = gemms::run(&tiled, &case).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}: the GPU-semantics executor");
            let looped = thread_loops(&tiled).unwrap();
            assert!(!format!("{:?}", looped.body).contains("Mma"), "{name}: the thread loops keep no warp product");
            let got = gemms::run(&looped, &case).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}: the thread loops");
        }
    }
}

/// A fragment read from the wrong place is a wrong number: the same tile with one
/// element of A's fragment taken from the neighbouring k fails the comparison.
#[test]
fn a_misplaced_fragment_gives_a_wrong_product() {
    use tnc_compiler::kernel::gemm_tiles::tile_gemm;
    use tnc_compiler::kernel::{Elem, Stmt};
    let case = gemms::cases(Elem::BF16).swap_remove(1);
    let mut tiled = tile_gemm(&case.node);
    // The tile's first fragment element of A: swap it with the second (k and k + 1).
    fn swap_first_fragment(body: &mut [Stmt]) -> bool {
        for s in body {
            match s {
                #[allow(clippy::collapsible_match)] // a guard cannot borrow `body` mutably
                Stmt::For { body, .. } => {
                    if swap_first_fragment(body) {
                        return true;
                    }
                }
                Stmt::Mma { a, .. } => {
                    a.swap(0, 1);
                    return true;
                }
                _ => {}
            }
        }
        false
    }
    assert!(swap_first_fragment(&mut tiled.body));
    let want = gemms::run(&case.node, &case).unwrap();
    let got = gemms::run(&tiled, &case).unwrap();
    let wrong = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert!(wrong > 0, "a misplaced fragment went unnoticed");
}

/// Hand-built row kernels: iteration `v0` is a row of `width` floats of `x` (buffer 0),
/// written to `out` (buffer 1).
mod rows {
    use tnc_compiler::kernel::exec::{run_all, Buffer};
    use tnc_compiler::kernel::{Access, Binary, BufferDecl, Elem, Expr, Kernel, Stmt, Var};

    /// The position of column `c` of the row.
    pub fn at(width: i64, c: Expr) -> Expr {
        Expr::binary(Binary::Add, Expr::binary(Binary::Mul, Expr::Var(Var(0)), Expr::I64(width)), c)
    }

    /// `x` at column `c` of the row.
    pub fn x_at(width: i64, c: Expr) -> Expr {
        Expr::Load { buffer: 0, index: Box::new(at(width, c)) }
    }

    pub fn kernel(name: &str, rows: i64, body: Vec<Stmt>) -> Kernel {
        let decl = |name: &str, access| BufferDecl { name: name.into(), elem: Elem::F32, access };
        Kernel {
            name: name.into(),
            buffers: vec![decl("x", Access::Read), decl("out", Access::Write)],
            sizes: vec![],
            scalars: vec![],
            index: Var(0),
            extent: Expr::I64(rows),
            body,
            gemm: None,
            threads: None,
        }
    }

    /// `out` after running `k` on `x` (NaN-filled first).
    pub fn run(k: &Kernel, x: &[f32]) -> Vec<f32> {
        let mut buffers = vec![Buffer::F32(x.to_vec()), Buffer::F32(vec![f32::NAN; x.len()])];
        run_all(k, &mut buffers, &[]).unwrap_or_else(|e| panic!("{}: {e}", k.name));
        let Buffer::F32(out) = &buffers[1] else { unreachable!("declared f32") };
        out.clone()
    }
}

/// Row reductions of a row kernel become block reductions when it is coalesced
/// (`kernel/blocks.rs`): a maximum and a Kahan sum over rows of 70 (three warps, so the
/// halving tree meets a block that is not a power of two), then `out = x − max + sum`.
/// The block kernel matches the kernel run one row per thread, and every thread holds
/// the totals (a missing barrier would be reported as a race).
#[test]
fn row_reductions_become_block_reductions() {
    use tnc_compiler::kernel::blocks::coalesce_rows;
    use tnc_compiler::kernel::{Binary, Expr, LoopKind, Scalar, Stmt, Var};
    const E: i64 = 70;
    const R: usize = 3;
    let bin = Expr::binary;
    let v = |i: u32| Expr::Var(Var(i));
    let x_at = |c: Expr| rows::x_at(E, c);
    let body = vec![
        Stmt::Mut { var: Var(1), ty: Scalar::F32, init: Expr::F32(f32::NEG_INFINITY) },
        Stmt::For {
            var: Var(2),
            extent: Expr::I64(E),
            kind: LoopKind::Serial,
            body: vec![Stmt::Assign { var: Var(1), value: bin(Binary::Max, v(1), x_at(v(2))) }],
        },
        Stmt::Mut { var: Var(3), ty: Scalar::F32, init: Expr::F32(0.0) },
        Stmt::Mut { var: Var(4), ty: Scalar::F32, init: Expr::F32(0.0) },
        Stmt::For {
            var: Var(5),
            extent: Expr::I64(E),
            kind: LoopKind::Serial,
            body: vec![
                Stmt::Let { var: Var(6), value: bin(Binary::Sub, x_at(v(5)), v(4)) },
                Stmt::Let { var: Var(7), value: bin(Binary::Add, v(3), v(6)) },
                Stmt::Assign { var: Var(4), value: bin(Binary::Sub, bin(Binary::Sub, v(7), v(3)), v(6)) },
                Stmt::Assign { var: Var(3), value: v(7) },
            ],
        },
        Stmt::For {
            var: Var(8),
            extent: Expr::I64(E),
            kind: LoopKind::Vector,
            body: vec![Stmt::Store {
                buffer: 1,
                index: rows::at(E, v(8)),
                value: bin(Binary::Add, bin(Binary::Sub, x_at(v(8)), v(1)), v(3)),
            }],
        },
    ];
    let serial = rows::kernel("rows", R as i64, body);
    let block = coalesce_rows(&serial);
    assert_eq!(block.threads, Some(96));
    let barriers = block.body.iter().filter(|s| matches!(s, Stmt::Barrier)).count();
    assert!(barriers >= 2 * 9, "two reductions of a 7-step tree: {barriers} barriers");
    let x: Vec<f32> = (0..R * E as usize).map(|i| ((i * 53 % 97) as f32 - 40.0) / 8.0).collect();
    let (want, got) = (rows::run(&serial, &x), rows::run(&block, &x));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!((w - g).abs() <= 1e-5 * (1.0 + w.abs()), "out[{i}] = {g}, want {w}");
    }
}

/// A sum that starts from a carried value (`s = c` before its loop, as the cross-entropy
/// carries its running sum from chunk to chunk) is not a block reduction: every thread
/// would add the carried value once. It stays one loop, run by every thread, and the
/// block kernel still matches the kernel run one row per thread.
#[test]
fn a_sum_from_a_carried_value_is_not_split_across_threads() {
    use tnc_compiler::kernel::blocks::coalesce_rows;
    use tnc_compiler::kernel::{Binary, Expr, LoopKind, Scalar, Stmt, Var};
    const E: i64 = 40;
    let bin = Expr::binary;
    let v = |i: u32| Expr::Var(Var(i));
    let x_at = |c: Expr| rows::x_at(E, c);
    let body = vec![
        Stmt::Mut { var: Var(1), ty: Scalar::F32, init: Expr::F32(0.0) },
        Stmt::Assign { var: Var(1), value: Expr::F32(100.0) },
        Stmt::For {
            var: Var(2),
            extent: Expr::I64(E),
            kind: LoopKind::Serial,
            body: vec![Stmt::Assign { var: Var(1), value: bin(Binary::Add, v(1), x_at(v(2))) }],
        },
        Stmt::For {
            var: Var(3),
            extent: Expr::I64(E),
            kind: LoopKind::Vector,
            body: vec![Stmt::Store { buffer: 1, index: rows::at(E, v(3)), value: bin(Binary::Sub, x_at(v(3)), v(1)) }],
        },
    ];
    let serial = rows::kernel("carried", 2, body);
    let block = coalesce_rows(&serial);
    assert!(block.threads.is_some(), "the vector loop is still dealt");
    assert!(!block.body.iter().any(|s| matches!(s, Stmt::Shared { .. })), "no block reduction");
    let x: Vec<f32> = (0..2 * E as usize).map(|i| (i % 7) as f32).collect();
    assert_eq!(rows::run(&serial, &x), rows::run(&block, &x));
}
