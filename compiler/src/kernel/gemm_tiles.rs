//! A rewrite of the kernel IR for GPUs: a GEMM library node (`gemm.rs`), which CPUs hand
//! to the `gemm` crate, becomes a generated block kernel of shared-memory tiles, so one
//! description of every dense product serves both.
//!
//! ```text
//! block (product b, tile row tm, tile column tn), 256 threads as 16 × 16 (ty, tx):
//!   shared As[TK × (TM + 1)], Bs[TK × (TN + 1)];  acc[4][4] = 0 (sixteen scalars)
//!   for each k-tile k0 = 0, TK, …:
//!     barrier
//!     As[kk, r] = A[row0 + r, k0 + kk]   Bs[kk, c] = B[k0 + kk, col0 + c]   (0 outside)
//!     barrier
//!     for kk in 0..TK:  acc[i][j] += As[kk, ty + 16i] · Bs[kk, tx + 16j]
//!   C[row0 + ty + 16i, col0 + tx + 16j] (+)= acc[i][j]   (inside C only)
//! ```
//!
//! Each thread computes a 4 × 4 grid of C whose columns are 16 apart, so a warp's stores
//! and its reads of `Bs` touch consecutive addresses. A tile is loaded with consecutive
//! threads on the operand's unit-stride axis when its stride is the constant 1 (a
//! row-major or transposed view), so global loads coalesce either way. Every element of C
//! adds its k terms in order, in f32, like the reference executor's naive product.

use super::gemm::Matrix;
use super::ir::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};

/// The C tile of a block (rows × columns) and the depth of a k-step.
const TM: i64 = 64;
const TN: i64 = 64;
const TK: i64 = 16;
/// Threads per block: a 16 × 16 grid, each thread 4 × 4 elements of the tile.
const THREADS: u32 = 256;
const SIDE: i64 = 16;
const PER: i64 = 4;
/// The stride of a k-row of a shared tile: one more than its width, so that threads
/// storing consecutive k of one row (a k-contiguous operand) hit different banks.
const A_ROW: i64 = TM + 1;
const B_ROW: i64 = TN + 1;

fn add(a: Expr, b: Expr) -> Expr {
    Expr::binary(Binary::Add, a, b)
}
fn mul(a: Expr, b: Expr) -> Expr {
    Expr::binary(Binary::Mul, a, b)
}
fn ceil_div(a: Expr, k: i64) -> Expr {
    Expr::binary(Binary::Div, add(a, Expr::I64(k - 1)), Expr::I64(k))
}
fn lt(a: Expr, b: Expr) -> Expr {
    Expr::binary(Binary::Lt, a, b)
}
fn and(a: Expr, b: Expr) -> Expr {
    Expr::binary(Binary::And, a, b)
}

/// Builds the kernel body, numbering fresh variables.
struct Body {
    stmts: Vec<Stmt>,
    next: u32,
}

impl Body {
    fn var(&mut self) -> Var {
        self.next += 1;
        Var(self.next - 1)
    }

    fn bind(&mut self, value: Expr) -> Expr {
        let var = self.var();
        self.stmts.push(Stmt::Let { var, value });
        Expr::Var(var)
    }
}

/// `k` as a tiled block kernel when it is a GEMM library node, else unchanged.
pub fn tile_gemm(k: &Kernel) -> Kernel {
    let Some(g) = &k.gemm else { return k.clone() };
    let mut b = Body { stmts: Vec::new(), next: k.next_var() };
    let (a_buf, b_buf, c_buf) = (0usize, 1usize, 2usize);
    let a_tile = b.var();
    let b_tile = b.var();
    b.stmts.push(Stmt::Shared { var: a_tile, elem: Scalar::F32, len: (TK * A_ROW) as usize });
    b.stmts.push(Stmt::Shared { var: b_tile, elem: Scalar::F32, len: (TK * B_ROW) as usize });

    // Block → (product, tile row, tile column), the column fastest.
    let (m, n, kk_total) = (b.bind(g.m.clone()), b.bind(g.n.clone()), b.bind(g.k.clone()));
    let cols = b.bind(ceil_div(n.clone(), TN));
    let rows = b.bind(ceil_div(m.clone(), TM));
    let block = Expr::Var(k.index);
    let col0 = b.bind(mul(Expr::binary(Binary::Rem, block.clone(), cols.clone()), Expr::I64(TN)));
    let rest = b.bind(Expr::binary(Binary::Div, block, cols));
    let row0 = b.bind(mul(Expr::binary(Binary::Rem, rest.clone(), rows.clone()), Expr::I64(TM)));
    let mut product = b.bind(Expr::binary(Binary::Div, rest, rows));
    // The product's offsets in A, B and C: its batch index, innermost axis last.
    let (mut a0, mut b0, mut c0) = (g.a.offset.clone(), g.b.offset.clone(), g.c.offset.clone());
    for ax in g.batch.iter().rev() {
        let i = b.bind(Expr::binary(Binary::Rem, product.clone(), ax.extent.clone()));
        product = b.bind(Expr::binary(Binary::Div, product, ax.extent.clone()));
        a0 = add(a0, mul(i.clone(), ax.a.clone()));
        b0 = add(b0, mul(i.clone(), ax.b.clone()));
        c0 = add(c0, mul(i, ax.c.clone()));
    }
    let (a0, b0, c0) = (b.bind(a0), b.bind(b0), b.bind(c0));
    let tx = b.bind(Expr::binary(Binary::Rem, Expr::Thread, Expr::I64(SIDE)));
    let ty = b.bind(Expr::binary(Binary::Div, Expr::Thread, Expr::I64(SIDE)));

    let mut acc = Vec::new();
    for _ in 0..PER * PER {
        let var = b.var();
        b.stmts.push(Stmt::Mut { var, ty: Scalar::F32, init: Expr::F32(0.0) });
        acc.push(var);
    }

    // One k-step.
    let kt = b.var();
    let outer = std::mem::take(&mut b.stmts);
    let k0 = b.bind(mul(Expr::Var(kt), Expr::I64(TK)));
    b.stmts.push(Stmt::Barrier);
    // A's tile (TM rows × TK) and B's (TK × TN columns) into shared memory.
    load_tile(&mut b, a_tile, a_buf, &g.a, &a0, (&row0, &m, TM), (&k0, &kk_total), false);
    load_tile(&mut b, b_tile, b_buf, &g.b, &b0, (&col0, &n, TN), (&k0, &kk_total), true);
    b.stmts.push(Stmt::Barrier);
    let kk = b.var();
    let step_outer = std::mem::take(&mut b.stmts);
    let a_vals: Vec<Expr> = (0..PER)
        .map(|i| {
            let at = add(mul(Expr::Var(kk), Expr::I64(A_ROW)), add(ty.clone(), Expr::I64(SIDE * i)));
            b.bind(Expr::load_array(a_tile, at))
        })
        .collect();
    let b_vals: Vec<Expr> = (0..PER)
        .map(|j| {
            let at = add(mul(Expr::Var(kk), Expr::I64(B_ROW)), add(tx.clone(), Expr::I64(SIDE * j)));
            b.bind(Expr::load_array(b_tile, at))
        })
        .collect();
    for i in 0..PER as usize {
        for j in 0..PER as usize {
            let var = acc[i * PER as usize + j];
            let value = add(Expr::Var(var), mul(a_vals[i].clone(), b_vals[j].clone()));
            b.stmts.push(Stmt::Assign { var, value });
        }
    }
    let inner = std::mem::replace(&mut b.stmts, step_outer);
    b.stmts.push(Stmt::For { var: kk, extent: Expr::I64(TK), kind: LoopKind::Serial, body: inner });
    let step = std::mem::replace(&mut b.stmts, outer);
    b.stmts.push(Stmt::For { var: kt, extent: ceil_div(kk_total, TK), kind: LoopKind::Serial, body: step });

    // The thread's elements of C, those inside it.
    for i in 0..PER {
        for j in 0..PER {
            let r = b.bind(add(row0.clone(), add(ty.clone(), Expr::I64(SIDE * i))));
            let c = b.bind(add(col0.clone(), add(tx.clone(), Expr::I64(SIDE * j))));
            let at = add(c0.clone(), add(mul(r.clone(), g.c.rows.clone()), mul(c.clone(), g.c.cols.clone())));
            let var = b.var();
            let sum = Expr::Var(acc[(i * PER + j) as usize]);
            let value = if g.accumulate {
                add(Expr::Load { buffer: c_buf, index: Box::new(Expr::Var(var)) }, sum)
            } else {
                sum
            };
            b.stmts.push(Stmt::If {
                cond: and(lt(r, m.clone()), lt(c, n.clone())),
                then: vec![Stmt::Let { var, value: at }, Stmt::Store { buffer: c_buf, index: Expr::Var(var), value }],
                otherwise: Vec::new(),
            });
        }
    }
    let mut buffers = k.buffers.clone();
    if g.accumulate {
        buffers[c_buf].access = Access::ReadWrite;
    }
    let mut extent = mul(ceil_div(g.m.clone(), TM), ceil_div(g.n.clone(), TN));
    for ax in &g.batch {
        extent = mul(extent, ax.extent.clone());
    }
    Kernel { buffers, extent, body: b.stmts, gemm: None, threads: Some(THREADS), ..k.clone() }
}

/// Stores one operand's tile into shared array `tile` (`tile[kk·(width + 1) + x]`, x along the
/// tile's rows of A or columns of B): `x0 + x < extent` and `k0 + kk < k` inside the
/// matrix, 0 outside. `columns`: the operand is B (`x` is its column, k its row).
#[allow(clippy::too_many_arguments)]
fn load_tile(
    b: &mut Body,
    tile: Var,
    buffer: usize,
    view: &Matrix,
    base: &Expr,
    (x0, extent, width): (&Expr, &Expr, i64),
    (k0, k): (&Expr, &Expr),
    columns: bool,
) {
    // The strides of x and of k in the buffer.
    let (x_stride, k_stride) = if columns { (&view.cols, &view.rows) } else { (&view.rows, &view.cols) };
    // Consecutive threads along k when k has unit stride, else along x.
    let k_fastest = *k_stride == Expr::I64(1) && *x_stride != Expr::I64(1);
    for round in 0..(TK * width) / i64::from(THREADS) {
        let e = b.bind(add(Expr::I64(round * i64::from(THREADS)), Expr::Thread));
        let (x, kk) = if k_fastest {
            (
                b.bind(Expr::binary(Binary::Div, e.clone(), Expr::I64(TK))),
                b.bind(Expr::binary(Binary::Rem, e, Expr::I64(TK))),
            )
        } else {
            (
                b.bind(Expr::binary(Binary::Rem, e.clone(), Expr::I64(width))),
                b.bind(Expr::binary(Binary::Div, e, Expr::I64(width))),
            )
        };
        let (gx, gk) = (b.bind(add(x0.clone(), x.clone())), b.bind(add(k0.clone(), kk.clone())));
        let at = add(base.clone(), add(mul(gx.clone(), x_stride.clone()), mul(gk.clone(), k_stride.clone())));
        let load = Expr::Load { buffer, index: Box::new(at) };
        let inside = and(lt(gx, extent.clone()), lt(gk, k.clone()));
        let value = Expr::Select(Box::new(inside), Box::new(load), Box::new(Expr::F32(0.0)));
        let index = add(mul(kk, Expr::I64(width + 1)), x);
        b.stmts.push(Stmt::StoreArray { array: tile, index, value });
    }
}
