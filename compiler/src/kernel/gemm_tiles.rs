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
//!
//! When A and B are both bf16 (or both f16) the products run on tensor cores instead
//! (`Stmt::Mma`, the fragments of `kernel/mma.rs`):
//!
//! ```text
//! block (product, tile row, tile column), 128 threads = 4 warps as 2 × 2:
//!   shared As[32 × 68], Bs[32 × 68];  each warp a 32 × 32 quarter of the 64 × 64 tile,
//!   as 2 × 4 products of 16 × 8: acc[2][4][4] = 0 (32 scalars per thread)
//!   for each k-tile of 32:  barrier, load As and Bs as above, barrier,
//!     for each step of 16:  load the thread's fragments of A (2 × 8) and B (4 × 4)
//!                           from shared memory, then 8 mma.m16n8k16
//!   C (+)= acc at the thread's fragment positions (inside C only)
//! ```
//!
//! A k-row of a tile is 68 floats, so the 32 lanes' fragment reads (k = 2·pair + …, row =
//! group + …) fall in 32 different banks. Each element of C still adds its k terms in
//! order in f32, so on the emulated GPU the tensor-core tile equals the naive product of
//! the same bf16 operands exactly; a real GPU's tensor cores may round the sums
//! differently (see `kernel/mma.rs`).

use super::gemm::Gemm;
use super::ir::{Access, Binary, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Var};
use super::mma;

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

/// The tensor-core tile: 4 warps, each 32 × 32 of the 64 × 64 tile, k-tiles of 32.
const MMA_THREADS: u32 = 128;
const MMA_TK: i64 = 32;
/// The k-row stride of its shared tiles (see the module documentation).
const MMA_ROW: i64 = TM + 4;
/// A warp's quarter of the tile, and its products of 16 × 8 along rows and columns.
const WARP_ROWS: i64 = 32;
const WARP_COLS: i64 = 32;
const MMA_MS: usize = (WARP_ROWS as usize) / mma::M;
const MMA_NS: usize = (WARP_COLS as usize) / mma::N;

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

/// `k` as a tiled block kernel unless cuBLAS can compute it ([`cublas_can_run`]), in
/// which case it stays a library node (`--gemm cublas`); any other kernel unchanged.
pub fn tile_gemm_unless_cublas(k: &Kernel) -> Kernel {
    if cublas_can_run(k) {
        k.clone()
    } else {
        tile_gemm(k)
    }
}

/// Whether `k` is a library GEMM node that cuBLAS's column-major strided-batched GEMM can
/// express at every size: A and B of one element type (f32, bf16 or f16) and C f32, and
/// each matrix with the constant stride 1 along one of its axes (rows or columns), so
/// that it is column-major or transposed with the other stride as its leading dimension.
/// Batch axes of any strides are loops of calls (the runtime's `cublas_plan.rs`). What
/// only sizes decide — a leading dimension below a row's length (rows that overlap, which
/// the scheduler's views never have) or a size past 2³¹ — is checked when the bundle
/// binds, with an error that names `--gemm tiles`.
pub fn cublas_can_run(k: &Kernel) -> bool {
    let Some(g) = &k.gemm else { return false };
    let unit = |m: &super::gemm::Matrix| matches!(m.rows, Expr::I64(1)) || matches!(m.cols, Expr::I64(1));
    let elems = (k.buffers[A_BUF].elem, k.buffers[B_BUF].elem, k.buffers[C_BUF].elem);
    let types = matches!(
        elems,
        (Elem::F32, Elem::F32, Elem::F32) | (Elem::BF16, Elem::BF16, Elem::F32) | (Elem::F16, Elem::F16, Elem::F32)
    );
    types && unit(&g.a) && unit(&g.b) && unit(&g.c)
}

/// `k` as a tiled block kernel when it is a GEMM library node, else unchanged: on tensor
/// cores when both operands are bf16 or both f16.
pub fn tile_gemm(k: &Kernel) -> Kernel {
    let Some(g) = &k.gemm else { return k.clone() };
    let input = match (k.buffers[0].elem, k.buffers[1].elem) {
        (Elem::BF16, Elem::BF16) => Some(Elem::BF16),
        (Elem::F16, Elem::F16) => Some(Elem::F16),
        _ => None,
    };
    let mut b = Body { stmts: Vec::new(), next: k.next_var() };
    let tile = match input {
        Some(input) => Tile { threads: MMA_THREADS, tk: MMA_TK, a_row: MMA_ROW, b_row: MMA_ROW, mma: Some(input) },
        None => Tile { threads: THREADS, tk: TK, a_row: A_ROW, b_row: B_ROW, mma: None },
    };
    let at = Placement::new(&mut b, k, g, &tile);
    let stores = match tile.mma {
        Some(input) => mma_products(&mut b, g, &at, &tile, input),
        None => fma_products(&mut b, g, &at, &tile),
    };
    // The thread's elements of C, those inside it.
    for (r, c, sum) in stores {
        let (r, c) = (b.bind(r), b.bind(c));
        let index = add(at.c0.clone(), add(mul(r.clone(), g.c.rows.clone()), mul(c.clone(), g.c.cols.clone())));
        let var = b.var();
        let value = if g.accumulate {
            add(Expr::Load { buffer: C_BUF, index: Box::new(Expr::Var(var)) }, Expr::Var(sum))
        } else {
            Expr::Var(sum)
        };
        b.stmts.push(Stmt::If {
            cond: and(lt(r, at.m.clone()), lt(c, at.n.clone())),
            then: vec![Stmt::Let { var, value: index }, Stmt::Store { buffer: C_BUF, index: Expr::Var(var), value }],
            otherwise: Vec::new(),
        });
    }
    let mut buffers = k.buffers.clone();
    if g.accumulate {
        buffers[C_BUF].access = Access::ReadWrite;
    }
    let mut extent = mul(ceil_div(g.m.clone(), TM), ceil_div(g.n.clone(), TN));
    for ax in &g.batch {
        extent = mul(extent, ax.extent.clone());
    }
    Kernel { buffers, extent, body: b.stmts, gemm: None, threads: Some(tile.threads), ..k.clone() }
}

/// The buffer slots of a library node.
const A_BUF: usize = 0;
const B_BUF: usize = 1;
const C_BUF: usize = 2;

/// A tiling: threads per block, the depth of a k-tile, the k-row strides of the shared
/// tiles, and whether the products run on tensor cores (with which input type).
struct Tile {
    threads: u32,
    tk: i64,
    a_row: i64,
    b_row: i64,
    mma: Option<Elem>,
}

/// Where a block works: the product's sizes, its C tile's first row and column, and the
/// product's offsets in A, B and C.
struct Placement {
    m: Expr,
    n: Expr,
    k: Expr,
    row0: Expr,
    col0: Expr,
    a0: Expr,
    b0: Expr,
    c0: Expr,
    /// The shared tiles of A (k-rows of `a_row`) and B.
    a_tile: Var,
    b_tile: Var,
}

impl Placement {
    /// Block → (product, tile row, tile column), the column fastest; declares the tiles.
    fn new(b: &mut Body, k: &Kernel, g: &Gemm, tile: &Tile) -> Placement {
        let (a_tile, b_tile) = (b.var(), b.var());
        b.stmts.push(Stmt::Shared { var: a_tile, elem: Scalar::F32, len: (tile.tk * tile.a_row) as usize });
        b.stmts.push(Stmt::Shared { var: b_tile, elem: Scalar::F32, len: (tile.tk * tile.b_row) as usize });
        let (m, n, kk) = (b.bind(g.m.clone()), b.bind(g.n.clone()), b.bind(g.k.clone()));
        let cols = b.bind(ceil_div(n.clone(), TN));
        let rows = b.bind(ceil_div(m.clone(), TM));
        let block = Expr::Var(k.index);
        let col0 = b.bind(mul(Expr::binary(Binary::Rem, block.clone(), cols.clone()), Expr::I64(TN)));
        let rest = b.bind(Expr::binary(Binary::Div, block, cols));
        let row0 = b.bind(mul(Expr::binary(Binary::Rem, rest.clone(), rows.clone()), Expr::I64(TM)));
        let mut product = b.bind(Expr::binary(Binary::Div, rest, rows));
        // The product's batch index, innermost axis last.
        let (mut a0, mut b0, mut c0) = (g.a.offset.clone(), g.b.offset.clone(), g.c.offset.clone());
        for ax in g.batch.iter().rev() {
            let i = b.bind(Expr::binary(Binary::Rem, product.clone(), ax.extent.clone()));
            product = b.bind(Expr::binary(Binary::Div, product, ax.extent.clone()));
            a0 = add(a0, mul(i.clone(), ax.a.clone()));
            b0 = add(b0, mul(i.clone(), ax.b.clone()));
            c0 = add(c0, mul(i, ax.c.clone()));
        }
        let (a0, b0, c0) = (b.bind(a0), b.bind(b0), b.bind(c0));
        Placement { m, n, k: kk, row0, col0, a0, b0, c0, a_tile, b_tile }
    }
}

/// The k-tile loop: `step` (run after both tiles are loaded, given the tile's k-loop
/// body builder) once per k-tile, between the barriers that guard the shared tiles.
fn k_tiles(b: &mut Body, g: &Gemm, at: &Placement, tile: &Tile, step: impl FnOnce(&mut Body)) {
    let kt = b.var();
    let outer = std::mem::take(&mut b.stmts);
    let k0 = b.bind(mul(Expr::Var(kt), Expr::I64(tile.tk)));
    b.stmts.push(Stmt::Barrier);
    let a_rows = (&at.row0, &at.m, TM, tile.a_row);
    let b_cols = (&at.col0, &at.n, TN, tile.b_row);
    load_tile(b, tile, at.a_tile, A_BUF, &g.a, &at.a0, a_rows, (&k0, &at.k), false);
    load_tile(b, tile, at.b_tile, B_BUF, &g.b, &at.b0, b_cols, (&k0, &at.k), true);
    b.stmts.push(Stmt::Barrier);
    step(b);
    let body = std::mem::replace(&mut b.stmts, outer);
    b.stmts.push(Stmt::For { var: kt, extent: ceil_div(at.k.clone(), tile.tk), kind: LoopKind::Serial, body });
}

/// Mutable f32 accumulators, zero.
fn accumulators(b: &mut Body, n: usize) -> Vec<Var> {
    (0..n)
        .map(|_| {
            let var = b.var();
            b.stmts.push(Stmt::Mut { var, ty: Scalar::F32, init: Expr::F32(0.0) });
            var
        })
        .collect()
}

/// The FMA tile: each thread's 4 × 4 elements; returns (row, column, sum) of each.
fn fma_products(b: &mut Body, g: &Gemm, at: &Placement, tile: &Tile) -> Vec<(Expr, Expr, Var)> {
    let tx = b.bind(Expr::binary(Binary::Rem, Expr::Thread, Expr::I64(SIDE)));
    let ty = b.bind(Expr::binary(Binary::Div, Expr::Thread, Expr::I64(SIDE)));
    let acc = accumulators(b, (PER * PER) as usize);
    k_tiles(b, g, at, tile, |b| {
        let kk = b.var();
        let outer = std::mem::take(&mut b.stmts);
        let a_vals: Vec<Expr> = (0..PER)
            .map(|i| {
                let i = add(mul(Expr::Var(kk), Expr::I64(A_ROW)), add(ty.clone(), Expr::I64(SIDE * i)));
                b.bind(Expr::load_array(at.a_tile, i))
            })
            .collect();
        let b_vals: Vec<Expr> = (0..PER)
            .map(|j| {
                let j = add(mul(Expr::Var(kk), Expr::I64(B_ROW)), add(tx.clone(), Expr::I64(SIDE * j)));
                b.bind(Expr::load_array(at.b_tile, j))
            })
            .collect();
        for i in 0..PER as usize {
            for j in 0..PER as usize {
                let var = acc[i * PER as usize + j];
                let value = add(Expr::Var(var), mul(a_vals[i].clone(), b_vals[j].clone()));
                b.stmts.push(Stmt::Assign { var, value });
            }
        }
        let inner = std::mem::replace(&mut b.stmts, outer);
        b.stmts.push(Stmt::For { var: kk, extent: Expr::I64(TK), kind: LoopKind::Serial, body: inner });
    });
    let mut out = Vec::new();
    for i in 0..PER {
        for j in 0..PER {
            let r = add(at.row0.clone(), add(ty.clone(), Expr::I64(SIDE * i)));
            let c = add(at.col0.clone(), add(tx.clone(), Expr::I64(SIDE * j)));
            out.push((r, c, acc[(i * PER + j) as usize]));
        }
    }
    out
}

/// The tensor-core tile: each warp's 2 × 4 products of 16 × 8; returns (row, column, sum)
/// of each of the thread's 32 accumulators.
fn mma_products(b: &mut Body, g: &Gemm, at: &Placement, tile: &Tile, input: Elem) -> Vec<(Expr, Expr, Var)> {
    let int = Expr::I64;
    let warp = b.bind(Expr::binary(Binary::Div, Expr::Thread, int(mma::WARP as i64)));
    let lane = b.bind(Expr::binary(Binary::Rem, Expr::Thread, int(mma::WARP as i64)));
    // The warp's first row and column in the tile, and the lane's base (`mma::lane_base`).
    let warp_row = b.bind(mul(Expr::binary(Binary::Div, warp.clone(), int(2)), int(WARP_ROWS)));
    let warp_col = b.bind(mul(Expr::binary(Binary::Rem, warp, int(2)), int(WARP_COLS)));
    let group = b.bind(Expr::binary(Binary::Div, lane.clone(), int(4)));
    let pair2 = b.bind(mul(Expr::binary(Binary::Rem, lane, int(4)), int(2)));
    // acc[(mi · NS + ni) · 4 + e]: element e of the product at rows mi, columns ni.
    let acc = accumulators(b, MMA_MS * MMA_NS * 4);
    k_tiles(b, g, at, tile, |b| {
        // The k-tile's steps of 16, as a loop (not unrolled: the emulated GPU compiles
        // the warp products as loops over threads, and half the code compiles faster).
        let step = b.var();
        let outer = std::mem::take(&mut b.stmts);
        let k0 = b.bind(mul(Expr::Var(step), int(mma::K as i64)));
        // Fragment element (r, c) of A at rows mi: tile row warp_row + 16·mi + group + r,
        // k = k0 + 2·pair + c; of B at columns ni: k = k0 + 2·pair + r, column warp_col +
        // 8·ni + group + c.
        let a: Vec<[Var; 8]> = (0..MMA_MS)
            .map(|mi| {
                std::array::from_fn(|i| {
                    let (r, c) = mma::a_element(0, i);
                    let row = add(warp_row.clone(), add(group.clone(), int((mma::M * mi + r) as i64)));
                    let k = add(k0.clone(), add(pair2.clone(), int(c as i64)));
                    fragment(b, at.a_tile, tile.a_row, k, row)
                })
            })
            .collect();
        let bf: Vec<[Var; 4]> = (0..MMA_NS)
            .map(|ni| {
                std::array::from_fn(|i| {
                    let (r, c) = mma::b_element(0, i);
                    let col = add(warp_col.clone(), add(group.clone(), int((mma::N * ni + c) as i64)));
                    let k = add(k0.clone(), add(pair2.clone(), int(r as i64)));
                    fragment(b, at.b_tile, tile.b_row, k, col)
                })
            })
            .collect();
        for (mi, a) in a.iter().enumerate() {
            for (ni, bv) in bf.iter().enumerate() {
                let at = (mi * MMA_NS + ni) * 4;
                let acc = [acc[at], acc[at + 1], acc[at + 2], acc[at + 3]];
                b.stmts.push(Stmt::Mma { input, acc, a: *a, b: *bv });
            }
        }
        let body = std::mem::replace(&mut b.stmts, outer);
        let steps = int(tile.tk / mma::K as i64);
        b.stmts.push(Stmt::For { var: step, extent: steps, kind: LoopKind::Serial, body });
    });
    let mut out = Vec::new();
    for mi in 0..MMA_MS {
        for ni in 0..MMA_NS {
            for e in 0..4 {
                let (r, c) = mma::c_element(0, e);
                let row =
                    add(at.row0.clone(), add(warp_row.clone(), add(group.clone(), int((mma::M * mi + r) as i64))));
                let col =
                    add(at.col0.clone(), add(warp_col.clone(), add(pair2.clone(), int((mma::N * ni + c) as i64))));
                out.push((row, col, acc[(mi * MMA_NS + ni) * 4 + e]));
            }
        }
    }
    out
}

/// A fragment element read from a shared tile: `tile[k · row_stride + x]`, bound to a
/// variable (the warp product reads variables).
fn fragment(b: &mut Body, tile: Var, row_stride: i64, k: Expr, x: Expr) -> Var {
    let var = b.var();
    let index = add(mul(k, Expr::I64(row_stride)), x);
    b.stmts.push(Stmt::Let { var, value: Expr::load_array(tile, index) });
    var
}

/// Stores one operand's tile into shared array `tile` (`tile[kk·row + x]`, x along the
/// tile's rows of A or columns of B): `x0 + x < extent` and `k0 + kk < k` inside the
/// matrix, 0 outside. `columns`: the operand is B (`x` is its column, k its row).
#[allow(clippy::too_many_arguments)]
fn load_tile(
    b: &mut Body,
    shape: &Tile,
    tile: Var,
    buffer: usize,
    view: &super::gemm::Matrix,
    base: &Expr,
    (x0, extent, width, row): (&Expr, &Expr, i64, i64),
    (k0, k): (&Expr, &Expr),
    columns: bool,
) {
    let (tk, threads) = (shape.tk, i64::from(shape.threads));
    // The strides of x and of k in the buffer.
    let (x_stride, k_stride) = if columns { (&view.cols, &view.rows) } else { (&view.rows, &view.cols) };
    // Consecutive threads along k when k has unit stride, else along x.
    let k_fastest = *k_stride == Expr::I64(1) && *x_stride != Expr::I64(1);
    for round in 0..(tk * width) / threads {
        let e = b.bind(add(Expr::I64(round * threads), Expr::Thread));
        let (x, kk) = if k_fastest {
            (
                b.bind(Expr::binary(Binary::Div, e.clone(), Expr::I64(tk))),
                b.bind(Expr::binary(Binary::Rem, e, Expr::I64(tk))),
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
        let index = add(mul(kk, Expr::I64(row)), x);
        b.stmts.push(Stmt::StoreArray { array: tile, index, value });
    }
}
