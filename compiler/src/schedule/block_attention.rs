//! Block attention (`ir::BlockAttention`) and its backward as staged kernels: one
//! parallel iteration per block (the flattened batch axes: batch, head, block index),
//! scores never written to memory.
//!
//! ```text
//! forward, per block:
//!   stage q', k' (w×d) and v' (w×e) into local arrays, each region element computed once
//!   S = q' k'ᵀ (w×w)
//!   for each row i:  P[:] = weights(S)[i, :];  out[i, :] = P v'
//! backward, per block (operands: the forward's, then dO):
//!   stage q', k', v', dO;  S = q' k'ᵀ;  P = weights(S);  dP = dO v'ᵀ
//!   dS = weights_vjp(S, dP)
//!   out[i, 0..d] = dS k'   out[j, d..2d] = dSᵀ q'   out[j, 2d..2d+e] = Pᵀ dO
//! ```
//!
//! The weights regions (scaling, mask, activation: softmax or ReLU) read S and dP from
//! the local arrays through [`Source::Array`], so their row reductions (softmax's max and
//! sum) run once per row. Needs the block width w and the head widths d, e to be
//! constants; full-sequence attention (w = N, the softmax baseline) keeps the composed
//! kernel of `special.rs`. Local memory per block: `w·(2d + e) + 2w²` floats forward,
//! `w·(2d + 2e) + 4w²` backward.
//!
//! On GPUs (`ScheduleOptions::gpu_blocks`) the same kernels are block kernels: one thread
//! block per attention block, the arrays in shared memory (dynamic beyond 48 KB, up to the
//! target's limit, else the kernel stays one thread per block), each phase — staging, the
//! products, the weights, the stores — dealt to the threads (`threads.rs`) with a barrier
//! between phases. The weights are dealt by rows, so a row's reductions still run once.

use super::element::{elem_of, Lowering, Source};
use super::emit::{add, mul};
use super::row_blocks::dividing_rows_per_block;
use super::threads::{deal, split, THREADS};
use crate::ir::{BlockAttention, BlockAttentionGrad, NodeId, Region, TensorType};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Stmt, Var};
use std::rc::Rc;

/// The constant (block width w, key width d, value width e) of a block attention, or
/// `None` when one of them is a run-time size.
pub fn constant_widths(ba: &BlockAttention) -> Option<(usize, usize, usize)> {
    let (q, v) = (ba.q.result_type(), ba.v.result_type());
    let r = q.rank();
    let c = |d: &crate::ir::Dim| d.as_const().filter(|&x| x > 0).map(|x| x as usize);
    Some((c(&q.shape[r - 2])?, c(&q.shape[r - 1])?, c(&v.shape[r - 1])?))
}

/// The most a block's staged arrays may take (bytes, the backward's, which are larger):
/// on a CPU they live in the worker thread's stack frame. A wider block (the KV-cache
/// window of a decode step over a long context) runs as the composed kernel of the
/// whole-sequence case instead.
const MAX_STAGED_BYTES: usize = 512 << 10;

/// [`constant_widths`] of a block attention staged per block: constant widths whose
/// arrays fit in [`MAX_STAGED_BYTES`].
pub fn staged_widths(ba: &BlockAttention) -> Option<(usize, usize, usize)> {
    constant_widths(ba).filter(|&w| block_floats(w, true) * 4 <= MAX_STAGED_BYTES)
}

/// What both kernels share: the block's index, its staged operands and widths.
struct Block {
    b_idx: Vec<Expr>,
    w: usize,
    d: usize,
    e: usize,
    q: Var,
    k: Var,
    v: Var,
    /// The scores' type `[batch…, w, w]`, for reading S (and dP) as region arguments.
    scores: TensorType,
    /// A GPU block kernel: arrays in shared memory, phases dealt to the threads.
    gpu: bool,
    /// The target's register budget for a CPU product's accumulators, in floats
    /// (`ScheduleOptions::accumulator_floats`).
    accumulator_floats: usize,
}

/// Floats of the arrays of one block: forward `w·(2d + e) + 2w²`, backward
/// `w·(2d + 2e) + 4w²`.
fn block_floats((w, d, e): (usize, usize, usize), backward: bool) -> usize {
    if backward {
        w * (2 * d + 2 * e) + 4 * w * w
    } else {
        w * (2 * d + e) + 2 * w * w
    }
}

/// Whether the kernel is a GPU block kernel: asked for, and its shared arrays fit (with
/// the 16-byte alignment of each of the at most seven arrays).
fn on_gpu(ba: &BlockAttention, backward: bool, opts: &super::ScheduleOptions) -> bool {
    let fits = |widths| (block_floats(widths, backward) * 4 + 7 * 16) <= opts.shared_limit;
    opts.gpu_blocks && staged_widths(ba).is_some_and(fits)
}

impl Block {
    /// Stages q', k', v' of the block (and declares the arrays).
    fn stage(
        lw: &mut Lowering,
        ba: &BlockAttention,
        ops: &[NodeId],
        gpu: bool,
        accumulator_floats: usize,
    ) -> Result<Block, String> {
        let (w, d, e) = staged_widths(ba).ok_or("block attention needs small constant block and head widths")?;
        let qt = ba.q.result_type().clone();
        let r = qt.rank();
        let batch = qt.shape[..r - 2].to_vec();
        let b_idx = lw.unravel(Expr::Var(lw.e.index), &batch)?;
        let (na, nb, nc) = (ba.q.args.len(), ba.k.args.len(), ba.v.args.len());
        let mut scores = qt.clone();
        scores.shape[r - 1] = qt.shape[r - 2].clone();
        let mut block = Block { b_idx, w, d, e, q: Var(0), k: Var(0), v: Var(0), scores, gpu, accumulator_floats };
        block.q = block.stage_region(lw, &ba.q, &ops[..na], d)?;
        block.k = block.stage_region(lw, &ba.k, &ops[na..na + nb], d)?;
        block.v = block.stage_region(lw, &ba.v, &ops[na + nb..na + nb + nc], e)?;
        Ok(block)
    }

    /// A `w × len`-float array: local, or shared by the block's threads.
    fn array(&self, lw: &mut Lowering, len: usize) -> Var {
        if self.gpu {
            lw.e.shared(len)
        } else {
            lw.e.array(len)
        }
    }

    /// The block's threads wait for each other (GPU; one thread per block needs nothing).
    fn sync(&self, lw: &mut Lowering) {
        if self.gpu {
            lw.e.push(Stmt::Barrier);
        }
    }

    /// `body(row, col)` for every element of a `rows × cols` tile: nested loops, or on
    /// GPUs the elements dealt to the threads.
    fn each(
        &self,
        lw: &mut Lowering,
        (rows, cols): (usize, usize),
        kinds: (LoopKind, LoopKind),
        body: impl FnOnce(&mut Lowering, Expr, Expr) -> Result<(), String>,
    ) -> Result<(), String> {
        let cols_i = Expr::I64(cols as i64);
        if self.gpu {
            return deal(lw, Expr::I64((rows * cols) as i64), |lw, x| {
                let (r, c) = split(lw, &x, &cols_i);
                body(lw, r, c)
            });
        }
        let r = lw.e.open();
        let c = lw.e.open();
        body(lw, Expr::Var(r), Expr::Var(c))?;
        lw.e.close(c, cols_i, kinds.1);
        lw.e.close(r, Expr::I64(rows as i64), kinds.0);
        Ok(())
    }

    /// A `w × width` array holding `source` at the block's rows.
    fn stage_source(&self, lw: &mut Lowering, source: Source, width: usize) -> Result<Var, String> {
        let arr = self.array(lw, self.w * width);
        self.each(lw, (self.w, width), (LoopKind::Serial, LoopKind::Vector), |lw, i, a| {
            let mut idx = self.b_idx.clone();
            idx.extend([i.clone(), a.clone()]);
            let value = lw.value(source, &idx)?;
            let at = add(mul(i, Expr::I64(width as i64)), a);
            lw.e.push(Stmt::StoreArray { array: arr, index: at, value });
            Ok(())
        })?;
        Ok(arr)
    }

    fn stage_region(&self, lw: &mut Lowering, region: &Region, args: &[NodeId], width: usize) -> Result<Var, String> {
        self.stage_source(lw, Source::region(Rc::new(region.clone()), args), width)
    }

    /// `out[i·w + j] = Σ_x a[i·ka + x·sa] · b[j·kb + x·sb]` for all i, j < w over x < n:
    /// the products of the block's small matrices.
    ///
    /// On CPUs `b` is first copied transposed, so that the columns j are contiguous, and
    /// the product is register-blocked (`super::row_blocks`): rows of `out` R at a time,
    /// each term a fused multiply-add, the sum over x in order. On GPUs each thread takes
    /// elements and sums their terms in the same order.
    fn product(&self, lw: &mut Lowering, out: Var, a: (Var, usize, usize), b: (Var, usize, usize), n: usize) {
        if !self.gpu {
            let bt = lw.e.array(self.w * n);
            let j = lw.e.open();
            let x = lw.e.open();
            let from = add(mul(Expr::Var(j), Expr::I64(b.1 as i64)), mul(Expr::Var(x), Expr::I64(b.2 as i64)));
            let to = add(mul(Expr::Var(x), Expr::I64(self.w as i64)), Expr::Var(j));
            lw.e.push(Stmt::StoreArray { array: bt, index: to, value: Expr::load_array(b.0, from) });
            lw.e.close(x, Expr::I64(n as i64), LoopKind::Serial);
            lw.e.close(j, Expr::I64(self.w as i64), LoopKind::Serial);
            let w = self.w;
            self.blocked(
                lw,
                n,
                w,
                &mut |_, row, x| {
                    let at = add(mul(row.clone(), Expr::I64(a.1 as i64)), mul(x.clone(), Expr::I64(a.2 as i64)));
                    Expr::load_array(a.0, at)
                },
                &mut |lw, x, j| Expr::load_array(bt, lw.e.bind(add(mul(x.clone(), Expr::I64(w as i64)), j.clone()))),
                &mut |lw, row, j, value| {
                    let at = lw.e.bind(add(mul(row.clone(), Expr::I64(w as i64)), j.clone()));
                    lw.e.push(Stmt::StoreArray { array: out, index: at, value });
                    Ok(())
                },
            )
            .expect("a product of local arrays cannot fail");
            return;
        }
        let done = self.each(lw, (self.w, self.w), (LoopKind::Serial, LoopKind::Serial), |lw, iv, jv| {
            let dot = lw.serial_sum(Expr::F32(0.0), Expr::I64(n as i64), |_, x| {
                let ai = add(mul(iv.clone(), Expr::I64(a.1 as i64)), mul(x.clone(), Expr::I64(a.2 as i64)));
                let bi = add(mul(jv.clone(), Expr::I64(b.1 as i64)), mul(x, Expr::I64(b.2 as i64)));
                Expr::Binary(Binary::Mul, Box::new(Expr::load_array(a.0, ai)), Box::new(Expr::load_array(b.0, bi)))
            });
            let at = add(mul(iv, Expr::I64(self.w as i64)), jv);
            lw.e.push(Stmt::StoreArray { array: out, index: at, value: dot });
            Ok(())
        });
        done.expect("a product of local arrays cannot fail");
    }

    /// A CPU product of `w` rows and `width` columns over `n` terms, register-blocked
    /// (`super::row_blocks`): `put(row, col, Σ_x left(row, x) · right(x, col))` for every
    /// row < w and col < width, the sum over x in order, each term a fused multiply-add
    /// into an accumulator array of R rows.
    #[allow(clippy::type_complexity)]
    fn blocked(
        &self,
        lw: &mut Lowering,
        n: usize,
        width: usize,
        left: &mut dyn FnMut(&mut Lowering, &Expr, &Expr) -> Expr,
        right: &mut dyn FnMut(&mut Lowering, &Expr, &Expr) -> Expr,
        put: &mut dyn FnMut(&mut Lowering, &Expr, &Expr, Expr) -> Result<(), String>,
    ) -> Result<(), String> {
        let rows = dividing_rows_per_block(width, self.w, self.accumulator_floats);
        let (ri, wi) = (Expr::I64(rows as i64), Expr::I64(width as i64));
        let acc = lw.e.array(rows * width);
        let rb = lw.e.open();
        let r0 = lw.e.bind(mul(Expr::Var(rb), ri.clone()));
        // `body(r, col)` for r < R and a vector loop over the columns.
        let rows_of = |lw: &mut Lowering, body: &mut dyn FnMut(&mut Lowering, &Expr, &Expr) -> Result<(), String>| {
            let r = lw.e.open();
            let c = lw.e.open();
            let done = body(lw, &Expr::Var(r), &Expr::Var(c));
            lw.e.close(c, wi.clone(), LoopKind::Vector);
            lw.e.close(r, ri.clone(), LoopKind::Serial);
            done
        };
        rows_of(lw, &mut |lw, r, c| {
            let at = lw.e.bind(add(mul(r.clone(), wi.clone()), c.clone()));
            lw.e.push(Stmt::StoreArray { array: acc, index: at, value: Expr::F32(0.0) });
            Ok(())
        })?;
        let x = lw.e.open();
        let xv = Expr::Var(x);
        rows_of(lw, &mut |lw, r, c| {
            let row = lw.e.bind(add(r0.clone(), r.clone()));
            let lv = left(lw, &row, &xv);
            let lv = lw.e.bind(lv);
            let rv = right(lw, &xv, c);
            let at = lw.e.bind(add(mul(r.clone(), wi.clone()), c.clone()));
            let value = Expr::mul_add(lv, rv, Expr::load_array(acc, at.clone()));
            lw.e.push(Stmt::StoreArray { array: acc, index: at, value });
            Ok(())
        })?;
        lw.e.close(x, Expr::I64(n as i64), LoopKind::Serial);
        rows_of(lw, &mut |lw, r, c| {
            let row = lw.e.bind(add(r0.clone(), r.clone()));
            let at = lw.e.bind(add(mul(r.clone(), wi.clone()), c.clone()));
            put(lw, &row, c, Expr::load_array(acc, at))
        })?;
        lw.e.close(rb, Expr::I64((self.w / rows) as i64), LoopKind::Serial);
        Ok(())
    }

    /// A `w × w` array of `region(args…)` (arguments: `w × w` arrays of the block). On
    /// GPUs each thread takes whole rows, so a row's reductions are computed once.
    fn apply(&self, lw: &mut Lowering, region: &Region, args: &[Var]) -> Result<Var, String> {
        let out = self.array(lw, self.w * self.w);
        let args: Rc<[Source]> =
            args.iter().map(|&a| Source::Array { array: a, ty: self.scores.clone(), keep: 2 }).collect();
        let source = Source::Region { region: Rc::new(region.clone()), value: region.result, args };
        let row = |lw: &mut Lowering, i: Expr| -> Result<(), String> {
            let j = lw.e.open();
            let mut idx = self.b_idx.clone();
            idx.extend([i.clone(), Expr::Var(j)]);
            let value = lw.value(source, &idx)?;
            let at = add(mul(i, Expr::I64(self.w as i64)), Expr::Var(j));
            lw.e.push(Stmt::StoreArray { array: out, index: at, value });
            lw.e.close(j, Expr::I64(self.w as i64), LoopKind::Serial);
            Ok(())
        };
        if self.gpu {
            deal(lw, Expr::I64(self.w as i64), row)?;
        } else {
            let i = lw.e.open();
            row(lw, Expr::Var(i))?;
            lw.e.close(i, Expr::I64(self.w as i64), LoopKind::Serial);
        }
        Ok(out)
    }

    /// Stores `Σ_x m[x·sm + r·tm] · a[x·width + c]` at `out[b…, r, offset + c]` for every
    /// row r < w and column c < width: a (transposed) block matrix times a staged operand
    /// (on CPUs register-blocked, [`Block::blocked`]).
    #[allow(clippy::too_many_arguments)]
    fn store_product(
        &self,
        lw: &mut Lowering,
        out: (usize, &TensorType),
        offset: usize,
        m: (Var, usize, usize),
        a: Var,
        width: usize,
    ) -> Result<(), String> {
        let mut put = |lw: &mut Lowering, rv: &Expr, cv: &Expr, value: Expr| -> Result<(), String> {
            let mut idx = self.b_idx.clone();
            idx.extend([rv.clone(), add(cv.clone(), Expr::I64(offset as i64))]);
            let lin = lw.linear(&idx, &out.1.shape)?;
            lw.e.push(Stmt::Store { buffer: out.0, index: lin, value });
            Ok(())
        };
        if !self.gpu {
            return self.blocked(
                lw,
                self.w,
                width,
                &mut |_, r, x| {
                    let mi = add(mul(x.clone(), Expr::I64(m.1 as i64)), mul(r.clone(), Expr::I64(m.2 as i64)));
                    Expr::load_array(m.0, mi)
                },
                &mut |lw, x, c| Expr::load_array(a, lw.e.bind(add(mul(x.clone(), Expr::I64(width as i64)), c.clone()))),
                &mut put,
            );
        }
        self.each(lw, (self.w, width), (LoopKind::Serial, LoopKind::Vector), |lw, rv, cv| {
            let value = lw.serial_sum(Expr::F32(0.0), Expr::I64(self.w as i64), |_, x| {
                let mi = add(mul(x.clone(), Expr::I64(m.1 as i64)), mul(rv.clone(), Expr::I64(m.2 as i64)));
                let ai = add(mul(x, Expr::I64(width as i64)), cv.clone());
                Expr::Binary(Binary::Mul, Box::new(Expr::load_array(m.0, mi)), Box::new(Expr::load_array(a, ai)))
            });
            put(lw, &rv, &cv, value)
        })
    }
}

fn finish_block(
    lw: &mut Lowering,
    blk: &Block,
    ba: &BlockAttention,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let qt = ba.q.result_type();
    let mut extent = Expr::I64(1);
    for dim in &qt.shape[..qt.rank() - 2] {
        extent = mul(extent, lw.e.dim(dim)?);
    }
    let (mut kernel, bindings) = super::finish(lw, name, extent)?;
    kernel.threads = blk.gpu.then_some(THREADS);
    Ok((kernel, bindings))
}

/// What both kernels start with: the output buffer slot and type, the staged block,
/// and the node's operands.
fn begin(
    lw: &mut Lowering,
    n: NodeId,
    ba: &BlockAttention,
    backward: bool,
    opts: &super::ScheduleOptions,
) -> Result<(Block, usize, TensorType, Vec<NodeId>), String> {
    let ops = lw.g.operands(n);
    let out_ty = lw.g.ty(n).clone();
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), elem_of(out_ty.dtype), Access::Write);
    let blk = Block::stage(lw, ba, &ops, on_gpu(ba, backward, opts), opts.accumulator_floats)?;
    Ok((blk, out, out_ty, ops))
}

/// The forward kernel of block attention node `n`.
pub fn forward(
    lw: &mut Lowering,
    n: NodeId,
    ba: &BlockAttention,
    opts: &super::ScheduleOptions,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let (blk, out, out_ty, _) = begin(lw, n, ba, false, opts)?;
    let (w, d, e) = (blk.w, blk.d, blk.e);
    blk.sync(lw);
    let s = blk.array(lw, w * w);
    blk.product(lw, s, (blk.q, d, 1), (blk.k, d, 1), d);
    blk.sync(lw);
    let p = blk.apply(lw, &ba.weights, &[s])?;
    blk.sync(lw);
    // out[i, y] = Σ_j P[i, j] v'[j, y]: P read row-major (x = j at stride 1, row i at w).
    blk.store_product(lw, (out, &out_ty), 0, (p, 1, w), blk.v, e)?;
    finish_block(lw, &blk, ba, name)
}

/// The backward kernel of block attention: `[dq' | dk' | dv']` of node `n`.
pub fn backward(
    lw: &mut Lowering,
    n: NodeId,
    bg: &BlockAttentionGrad,
    opts: &super::ScheduleOptions,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let ba = &bg.forward;
    let (blk, out, out_ty, ops) = begin(lw, n, ba, true, opts)?;
    let (w, d, e) = (blk.w, blk.d, blk.e);
    let d_o = *ops.get(ba.operand_count()).ok_or("block attention's backward has no output cotangent")?;
    let go = blk.stage_source(lw, Source::Node(d_o), e)?;
    blk.sync(lw);
    let s = blk.array(lw, w * w);
    blk.product(lw, s, (blk.q, d, 1), (blk.k, d, 1), d);
    let dp = blk.array(lw, w * w);
    blk.product(lw, dp, (go, e, 1), (blk.v, e, 1), e);
    blk.sync(lw);
    let p = blk.apply(lw, &ba.weights, &[s])?;
    let ds = blk.apply(lw, &bg.weights_vjp, &[s, dp])?;
    blk.sync(lw);
    // dq'[i] = Σ_j dS[i, j] k'[j];  dk'[j] = Σ_i dS[i, j] q'[i];  dv'[j] = Σ_i P[i, j] dO[i].
    blk.store_product(lw, (out, &out_ty), 0, (ds, 1, w), blk.k, d)?;
    blk.store_product(lw, (out, &out_ty), d, (ds, w, 1), blk.q, d)?;
    blk.store_product(lw, (out, &out_ty), 2 * d, (p, w, 1), go, e)?;
    finish_block(lw, &blk, ba, name)
}
