//! The one generic chunked-scan kernel of the linear-attention normal form
//! (`ir::LinearAttention`), for every direction, with or without decay, whatever prologue
//! regions the op carries (Lightning Attention, arXiv 2401.04658):
//!
//! ```text
//! parallel b over the flattened batch axes (batch, heads):
//!   S[d×e] = 0 (f32);  P[k] = λ_b^k for k in 0..=C' (decay only)
//!   for each chunk of C tokens (in order; from the end when anticausal):
//!     stage q', k' (len×d) and v' (len×e) of the chunk into local arrays, evaluating
//!       the regions once per element
//!     for each block of R rows i of the chunk:
//!       W[i, m] = λ^{|i−m|} q_i·k_m for m ∈ dir(i) inside the chunk   (intra-chunk scores)
//!       O[i, :] = λ^{dist(i)} q_i S + Σ_m W[i, m] v_m                  (inter + intra)
//!       out[b, start + i, :] = O[i, :]
//!     S ← λ^{len} S + Σ_m λ^{w(m)} k_mᵀ v_m                            (carry the state)
//! ```
//!
//! with, as in the interpreter's `chunked`: causal `dist(i) = i + 1`, `w(m) = len − 1 − m`;
//! anticausal `dist(i) = len − i`, `w(m) = m` (positions relative to the chunk start).
//! `Full` (never decayed) builds `S = Σ_m k_mᵀ v_m` in one pass over the chunks, then
//! `o_n = q_n S` in a second.
//!
//! The last chunk may be partial: every loop over a chunk's rows runs to the chunk's
//! run-time length, so nothing past `N` is read or written. d and e (head widths) must be
//! constants; `N` and the batch sizes are run-time sizes. Memory is linear in `N`: the
//! kernel writes only its output, everything else lives in local arrays of constant size
//! (`C'·(d + e) + d·C'' + d·e + R·(C'' + e) + C' + 1` floats, C' and C'' the chunk
//! rounded up to whole row blocks and to whole 64-key score blocks).
//!
//! Every product is written as a small matrix product the code generator keeps in
//! registers: a contiguous innermost loop (the vector), the block's R rows side by side
//! in a constant loop around it (independent sums), the reduction axis outside both, and
//! each step a fused multiply-add (`Expr::MulAdd`). k' is staged transposed
//! (`kᵀ[a·C'' + m]`), so the scores of a row block are `W[r, m] += q_{i0+r}[a] · kᵀ[a, m]`
//! for each a in turn (the same order of terms per score as a dot product, which would be
//! a serial chain of d dependent additions). On the benchmark T1 (d = e = 64, C = 64, AVX-512)
//! this took the forward kernel from 3.4 to 2.0 ms per layer (B 2, N 1024).

use super::element::{elem_of, Lowering, Source};
use super::emit::{add, bin, div, mul, sub};
use super::row_blocks::{dividing_rows_per_block, rows_per_block};
use crate::ir::{Decay, Direction, LinearAttention, NodeId, Region, LOG_GATE_FLOOR};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Unary, Var};
use std::rc::Rc;

/// The chunk length used when none is given.
pub const DEFAULT_CHUNK: usize = 64;

fn f(op: Binary, a: Expr, b: Expr) -> Expr {
    bin(op, a, b)
}

/// One of the three prologue regions, applied to its slice of the op's operands.
pub(super) struct Operand {
    region: Rc<Region>,
    args: Rc<[NodeId]>,
}

impl Operand {
    pub fn at(&self, lw: &mut Lowering, idx: &[Expr]) -> Result<Expr, String> {
        let s = Source::region(self.region.clone(), &self.args);
        lw.value(s, idx)
    }
}

/// What both kernels (this one and the GPU block kernel) need to know of the op: its
/// three regions with their operands, the decay operand, and the shapes.
pub(super) struct Parts {
    pub q: Operand,
    pub k: Operand,
    pub v: Operand,
    pub lam: Option<NodeId>,
    /// The log-gates of a gated attention (`Decay::PerToken`), `[batch…, N]`.
    pub gate: Option<NodeId>,
    pub out_ty: crate::ir::TensorType,
    /// The flattened batch axes (batch, heads).
    pub batch: Vec<crate::ir::Dim>,
    pub len_n: Expr,
    /// Key and value widths (constants).
    pub d: usize,
    pub e: usize,
}

impl Parts {
    pub fn of(lw: &Lowering, n: NodeId, la: &LinearAttention) -> Result<Parts, String> {
        let g = lw.g;
        let ops = g.operands(n);
        let (na, nb, nc) = (la.q.args.len(), la.k.args.len(), la.v.args.len());
        let part = |r: &Region, from: usize, count: usize| Operand {
            region: Rc::new(r.clone()),
            args: ops[from..from + count].to_vec().into(),
        };
        let (q, k, v) = (part(&la.q, 0, na), part(&la.k, na, nb), part(&la.v, na + nb, nc));
        let (lam, gate) = match la.decay {
            Decay::None => (None, None),
            Decay::PerHead => (Some(ops[na + nb + nc]), None),
            Decay::PerToken => (None, Some(ops[na + nb + nc])),
        };
        if la.direction == Direction::Full && la.decay != Decay::None {
            return Err("a decayed linear attention must be causal or anticausal".into());
        }
        let out_ty = g.ty(n).clone();
        let qt = la.q.result_type().clone();
        let r = qt.rank();
        let width = |d: &crate::ir::Dim, what: &str| -> Result<usize, String> {
            d.as_const()
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or_else(|| format!("linear attention needs a constant {what} width, got {d}"))
        };
        Ok(Parts {
            q,
            k,
            v,
            lam,
            gate,
            batch: qt.shape[..r - 2].to_vec(),
            len_n: lw.e.dim(&qt.shape[r - 2])?,
            d: width(&qt.shape[r - 1], "key")?,
            e: width(&out_ty.shape[r - 1], "value")?,
            out_ty,
        })
    }

    /// λ for the batch index `b_idx` (size-1 axes of λ broadcast).
    pub fn decay_at(&self, lw: &mut Lowering, b_idx: &[Expr]) -> Result<Option<Expr>, String> {
        let Some(l) = self.lam else { return Ok(None) };
        let at = broadcast_index(lw, l, b_idx);
        lw.value(Source::Node(l), &at).map(Some)
    }

    /// The log-gate at batch index `b_idx` and position `pos`, floored at
    /// [`LOG_GATE_FLOOR`] (size-1 batch axes of the gates broadcast), or none without a gate.
    pub fn log_gate_at(&self, lw: &mut Lowering, b_idx: &[Expr], pos: Expr) -> Result<Option<Expr>, String> {
        let Some(a) = self.gate else { return Ok(None) };
        let mut at = broadcast_index(lw, a, b_idx);
        at.push(pos);
        let value = lw.value(Source::Node(a), &at)?;
        Ok(Some(bin(Binary::Max, value, Expr::F32(LOG_GATE_FLOOR as f32))))
    }

    /// The number of parallel iterations over the batch axes.
    pub fn batch_extent(&self, lw: &Lowering) -> Result<Expr, String> {
        let mut extent = Expr::I64(1);
        for dim in &self.batch {
            extent = mul(extent, lw.e.dim(dim)?);
        }
        Ok(extent)
    }
}

/// The batch index `b_idx` into operand `x`, whose size-1 batch axes broadcast (index 0).
fn broadcast_index(lw: &Lowering, x: NodeId, b_idx: &[Expr]) -> Vec<Expr> {
    let shape = &lw.g.ty(x).shape;
    shape.iter().zip(b_idx).map(|(dim, i)| if dim.as_const() == Some(1) { Expr::I64(0) } else { i.clone() }).collect()
}

/// λ's powers `λ^0 … λ^C` in an array (local, or shared by a block), or none without
/// decay.
#[derive(Clone, Copy)]
pub(super) struct Powers(pub Option<Var>);

impl Powers {
    /// `λ^k`, or nothing without decay.
    pub fn at(self, k: Expr) -> Option<Expr> {
        self.0.map(|pw| Expr::load_array(pw, k))
    }

    /// `x · λ^k` (`x` without decay).
    pub fn scale(self, x: Expr, k: Expr) -> Expr {
        match self.at(k) {
            Some(p) => bin(Binary::Mul, x, p),
            None => x,
        }
    }
}

/// The serial loop over a sequence's chunks of `c` tokens, the last one partial.
pub(super) struct Chunks {
    /// How many chunks: the loop's extent when closing it.
    pub count: Expr,
    c: Expr,
    len_n: Expr,
}

impl Chunks {
    pub fn new(lw: &mut Lowering, len_n: &Expr, c: usize) -> Chunks {
        let ci = Expr::I64(c as i64);
        let count = lw.e.bind(div(add(len_n.clone(), Expr::I64(c as i64 - 1)), ci.clone()));
        Chunks { count, c: ci, len_n: len_n.clone() }
    }

    /// Opens the loop (from the last chunk when `reverse`); returns its variable, the
    /// chunk's start and its length. Close it with `lw.e.close(t, count, Serial)`.
    pub fn open(&self, lw: &mut Lowering, reverse: bool) -> (Var, Expr, Expr) {
        let t = lw.e.open();
        let index = if reverse { sub(sub(self.count.clone(), Expr::I64(1)), Expr::Var(t)) } else { Expr::Var(t) };
        let index = lw.e.bind(index);
        let start = lw.e.bind(mul(index, self.c.clone()));
        let len = lw.e.bind(bin(Binary::Min, self.c.clone(), sub(self.len_n.clone(), start.clone())));
        (t, start, len)
    }
}

/// A gated attention's factors for the chunk in hand (`Decay::PerToken`), local arrays
/// over the chunk's positions i, m (relative to its start): `cum` the inclusive cumulative
/// log-gates `b`, `inter[i]` the factor on `q_i S`, `update[m]` the factor on `k_mᵀ v_m`
/// as it joins the state. Causal: `exp(b_i)`, `exp(b_{len−1} − b_m)`; anticausal, whose
/// state also counts the gate of the position after the chunk: `exp(b_{len−1} − b_i)`,
/// `exp(b_m)`. Scores are scaled by `exp(±(b_i − b_m))` and the state carried past the
/// chunk by `exp(b_{len−1})` (the interpreter's `ChunkFactors`). Only differences of
/// cumulative sums inside one chunk are exponentiated: for gates ≤ 1 no exponent a
/// stored value uses is positive, however long the sequence.
#[derive(Clone, Copy)]
pub(super) struct GateArrays {
    pub cum: Var,
    pub inter: Var,
    pub update: Var,
}

impl GateArrays {
    /// Arrays of `len` floats (the cumulative gates: `cum_len`, for score columns past
    /// the chunk), or none without a gate.
    pub fn new(lw: &mut Lowering, parts: &Parts, cum_len: usize, len: usize) -> Option<GateArrays> {
        parts.gate?;
        Some(GateArrays { cum: lw.e.array(cum_len), inter: lw.e.array(len), update: lw.e.array(len) })
    }

    /// Fills the arrays for the chunk at `start` of `len` tokens; returns the state's
    /// carry factor `exp(b_{len−1})`.
    pub fn fill(
        self,
        lw: &mut Lowering,
        parts: &Parts,
        b_idx: &[Expr],
        (start, len): (&Expr, &Expr),
        reverse: bool,
    ) -> Result<Expr, String> {
        let acc = lw.e.accumulator(lw.e.depth(), Scalar::F32, Expr::F32(0.0));
        let i = lw.e.open();
        let pos = lw.e.bind(add(start.clone(), Expr::Var(i)));
        let a = parts.log_gate_at(lw, b_idx, pos)?.expect("a gated attention");
        lw.e.push(Stmt::Assign { var: acc, value: add(Expr::Var(acc), a) });
        lw.e.push(Stmt::StoreArray { array: self.cum, index: Expr::Var(i), value: Expr::Var(acc) });
        lw.e.close(i, len.clone(), LoopKind::Serial);
        let last = lw.e.bind(Expr::load_array(self.cum, sub(len.clone(), Expr::I64(1))));
        let m = lw.e.open();
        let cm = lw.e.bind(Expr::load_array(self.cum, Expr::Var(m)));
        let (inter, update) = gate_factors(last.clone(), cm, reverse);
        lw.e.push(Stmt::StoreArray { array: self.inter, index: Expr::Var(m), value: inter });
        lw.e.push(Stmt::StoreArray { array: self.update, index: Expr::Var(m), value: update });
        lw.e.close(m, len.clone(), LoopKind::Vector);
        Ok(lw.e.bind(exp(last)))
    }

    /// The factor of the score of row i against key m.
    pub fn score(self, i: Expr, m: Expr, reverse: bool) -> Expr {
        gate_score(self.cum, i, m, reverse)
    }
}

pub(super) fn exp(x: Expr) -> Expr {
    Expr::Unary(Unary::Exp, Box::new(x))
}

/// The factor of the score of row i against key m, from the chunk's cumulative
/// log-gates `cum`: `exp(b_i − b_m)` (causal) or `exp(b_m − b_i)` (anticausal).
pub(super) fn gate_score(cum: Var, i: Expr, m: Expr, reverse: bool) -> Expr {
    let (ci, cm) = (Expr::load_array(cum, i), Expr::load_array(cum, m));
    exp(if reverse { sub(cm, ci) } else { sub(ci, cm) })
}

/// The factors of position m of a chunk whose cumulative log-gates end at `last`, with
/// `cm = b_m`: (on `q_m S`, on `k_mᵀ v_m`) — causal `(e^{b_m}, e^{b_last − b_m})`,
/// anticausal `(e^{b_last − b_m}, e^{b_m})`.
pub(super) fn gate_factors(last: Expr, cm: Expr, reverse: bool) -> (Expr, Expr) {
    if reverse {
        (exp(sub(last, cm.clone())), exp(cm))
    } else {
        (exp(cm.clone()), exp(sub(last, cm)))
    }
}

/// Scores are computed for blocks of this many key columns (four AVX-512 registers:
/// LLVM unrolls a loop of 32 before vectorizing it, and then vectorizes across rows).
const SCORE_COLUMNS: usize = 64;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The chunked kernel of linear attention node `n`, with chunks of `chunk` tokens.
///
/// Each chunk's rows are taken `R` at a time (a row block, `super::row_blocks`), and the
/// state update `R` rows of S at a time, so that every product below keeps several
/// independent accumulators: the scores of a block against 32 key columns, the block's
/// outputs, or a block of S rows, each summed over its inner axis in order. Every output
/// and state element adds the same terms in the same order as the row-at-a-time form
/// (inter-chunk first, then the chunk's keys in ascending position), so the blocking
/// changes no result. The staged arrays are padded to whole blocks (rows `R`, key
/// columns 32); a block's rows past the chunk's end compute values that are never stored.
pub fn kernel(
    lw: &mut Lowering,
    n: NodeId,
    la: &LinearAttention,
    opts: &super::ScheduleOptions,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let c = opts.chunk.max(1);
    let parts = Parts::of(lw, n, la)?;
    let Parts { q, k, v, out_ty, batch, len_n, d, e, .. } = &parts;
    let (d, e) = (*d, *e);
    let (di, ei) = (Expr::I64(d as i64), Expr::I64(e as i64));
    // Rows of the chunk taken together (`super::row_blocks`), at most the chunk length.
    let rb = rows_per_block(e, c, opts.accumulator_floats);
    let rbi = Expr::I64(rb as i64);
    // Rows of S updated together: a divisor of d.
    let sb = dividing_rows_per_block(e, d, opts.accumulator_floats);
    // Padded chunk rows and key columns.
    let cr = round_up(c, rb);
    let cp = round_up(cr, SCORE_COLUMNS);
    let cpi = Expr::I64(cp as i64);
    let sci = Expr::I64(SCORE_COLUMNS as i64);

    let b_idx = lw.unravel(Expr::Var(lw.e.index), batch)?;
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), elem_of(out_ty.dtype), Access::Write);

    // Local arrays: the state, the chunk's staged rows, a row block's scores and outputs,
    // and the powers of the decay.
    let s = lw.e.array(d * e);
    let qs = lw.e.array(cr * d);
    // Transposed: kt[a·cp + m].
    let kt = lw.e.array(d * cp);
    let vs = lw.e.array(cr * e);
    // w[r·cp + m]: row r of the block against key m; o[r·e + j].
    let w = lw.e.array(rb * cp);
    let o = lw.e.array(rb * e);
    // λ^0 … λ^{cr}: the exponents of a block's rows past the chunk's end reach cr.
    let pw = match parts.decay_at(lw, &b_idx)? {
        Some(lam) => {
            let pw = lw.e.array(cr + 1);
            let p = lw.e.open();
            let value = f(Binary::Pow, lam, Expr::Cast(Scalar::F32, Box::new(Expr::Var(p))));
            lw.e.push(Stmt::StoreArray { array: pw, index: Expr::Var(p), value });
            lw.e.close(p, Expr::I64(cr as i64 + 1), LoopKind::Serial);
            Some(pw)
        }
        None => None,
    };
    let powers = Powers(pw);
    let gate = GateArrays::new(lw, &parts, cp, cr);
    let chunks = Chunks::new(lw, len_n, c);
    // Stage the chunk's rows of the given operands (`(operand, array, width, transposed)`).
    type Staged<'a> = (&'a Operand, Var, usize, bool);
    let stage = |lw: &mut Lowering, start: &Expr, len: &Expr, which: &[Staged]| -> Result<(), String> {
        let i = lw.e.open();
        let pos = lw.e.bind(add(start.clone(), Expr::Var(i)));
        for &(operand, arr, wdt, transposed) in which {
            let row = lw.e.bind(mul(Expr::Var(i), Expr::I64(wdt as i64)));
            let a = lw.e.open();
            let mut idx = b_idx.clone();
            idx.extend([pos.clone(), Expr::Var(a)]);
            let value = operand.at(lw, &idx)?;
            let at = if transposed {
                lw.e.bind(add(mul(Expr::Var(a), cpi.clone()), Expr::Var(i)))
            } else {
                lw.e.bind(add(row, Expr::Var(a)))
            };
            lw.e.push(Stmt::StoreArray { array: arr, index: at, value });
            lw.e.close(a, Expr::I64(wdt as i64), LoopKind::Vector);
        }
        lw.e.close(i, len.clone(), LoopKind::Serial);
        Ok(())
    };
    // `for r in 0..R { for vector j in 0..width { body(r, j) } }`, `R` = `rows` (a
    // constant, so that the code generator unrolls it and keeps the rows side by side).
    let rows_of = |lw: &mut Lowering, rows: usize, width: &Expr, body: &mut dyn FnMut(&mut Lowering, &Expr, &Expr)| {
        let r = lw.e.open();
        let j = lw.e.open();
        body(lw, &Expr::Var(r), &Expr::Var(j));
        lw.e.close(j, width.clone(), LoopKind::Vector);
        lw.e.close(r, Expr::I64(rows as i64), LoopKind::Serial);
    };
    // `o[r, :] = scale(r) · q_{i0+r} S` for the block's rows (`scale = None`: 1).
    let inter = |lw: &mut Lowering, i0: &Expr, scale: &dyn Fn(&mut Lowering, &Expr) -> Option<Expr>| {
        rows_of(lw, rb, &ei, &mut |lw, r, j| {
            let at = lw.e.bind(add(mul(r.clone(), ei.clone()), j.clone()));
            lw.e.push(Stmt::StoreArray { array: o, index: at, value: Expr::F32(0.0) });
        });
        let a = lw.e.open();
        let srow = lw.e.bind(mul(Expr::Var(a), ei.clone()));
        rows_of(lw, rb, &ei, &mut |lw, r, j| {
            let i = lw.e.bind(add(i0.clone(), r.clone()));
            let qa = Expr::load_array(qs, lw.e.bind(add(mul(i.clone(), di.clone()), Expr::Var(a))));
            let qa = match scale(lw, &i) {
                Some(sc) => f(Binary::Mul, qa, sc),
                None => qa,
            };
            let qa = lw.e.bind(qa);
            let sv = Expr::load_array(s, lw.e.bind(add(srow.clone(), j.clone())));
            let at = lw.e.bind(add(mul(r.clone(), ei.clone()), j.clone()));
            let value = Expr::mul_add(qa, sv, Expr::load_array(o, at.clone()));
            lw.e.push(Stmt::StoreArray { array: o, index: at, value });
        });
        lw.e.close(a, di.clone(), LoopKind::Serial);
    };
    // `o[r, :] += wm · v_m` for one key m and block row r.
    let intra_term = |lw: &mut Lowering, r: &Expr, m: &Expr, exp: Expr| {
        let wm = Expr::load_array(w, lw.e.bind(add(mul(r.clone(), cpi.clone()), m.clone())));
        let wm = lw.e.bind(powers.scale(wm, exp));
        let vrow = lw.e.bind(mul(m.clone(), ei.clone()));
        let j = lw.e.open();
        let vj = Expr::load_array(vs, lw.e.bind(add(vrow, Expr::Var(j))));
        let at = lw.e.bind(add(mul(r.clone(), ei.clone()), Expr::Var(j)));
        let value = Expr::mul_add(wm, vj, Expr::load_array(o, at.clone()));
        lw.e.push(Stmt::StoreArray { array: o, index: at, value });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
    };
    // Store the block's first `rows` rows of `o` at positions `start + i0 + r`.
    let store_rows = |lw: &mut Lowering, start: &Expr, i0: &Expr, rows: &Expr| -> Result<(), String> {
        let r = lw.e.open();
        let pos = lw.e.bind(add(add(start.clone(), i0.clone()), Expr::Var(r)));
        let j = lw.e.open();
        let mut idx = b_idx.clone();
        idx.extend([pos, Expr::Var(j)]);
        let lin = lw.linear(&idx, &out_ty.shape)?;
        let at = lw.e.bind(add(mul(Expr::Var(r), ei.clone()), Expr::Var(j)));
        lw.e.push(Stmt::Store { buffer: out, index: lin, value: Expr::load_array(o, at) });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
        lw.e.close(r, rows.clone(), LoopKind::Serial);
        Ok(())
    };
    // Open the loop over the chunk's row blocks; returns its variable, the block's first
    // row and how many of its rows lie inside the chunk.
    let open_blocks = |lw: &mut Lowering, len: &Expr| {
        let ib = lw.e.open();
        let i0 = lw.e.bind(mul(Expr::Var(ib), rbi.clone()));
        let rows = lw.e.bind(bin(Binary::Min, rbi.clone(), sub(len.clone(), i0.clone())));
        (ib, i0, rows)
    };
    let block_count = |len: &Expr| div(add(len.clone(), Expr::I64(rb as i64 - 1)), rbi.clone());
    // `S ← λ^{len} S + Σ_m λ^{w(m)} k_mᵀ v_m` over the staged chunk, `sb` rows of S at a time.
    let update = |lw: &mut Lowering, len: &Expr, reverse: bool, gate_carry: Option<Expr>| {
        let ab = lw.e.open();
        let a0 = lw.e.bind(mul(Expr::Var(ab), Expr::I64(sb as i64)));
        if let Some(carry) = gate_carry.clone().or_else(|| powers.at(len.clone())) {
            rows_of(lw, sb, &ei, &mut |lw, r, j| {
                let at = lw.e.bind(add(mul(add(a0.clone(), r.clone()), ei.clone()), j.clone()));
                let value = f(Binary::Mul, Expr::load_array(s, at.clone()), carry.clone());
                lw.e.push(Stmt::StoreArray { array: s, index: at, value });
            });
        }
        let m = lw.e.open();
        let exp = if reverse { Expr::Var(m) } else { lw.e.bind(sub(sub(len.clone(), Expr::I64(1)), Expr::Var(m))) };
        let vrow = lw.e.bind(mul(Expr::Var(m), ei.clone()));
        rows_of(lw, sb, &ei, &mut |lw, r, j| {
            let a = lw.e.bind(add(a0.clone(), r.clone()));
            let ka = Expr::load_array(kt, lw.e.bind(add(mul(a.clone(), cpi.clone()), Expr::Var(m))));
            let coef = match gate {
                Some(ga) => f(Binary::Mul, ka, Expr::load_array(ga.update, Expr::Var(m))),
                None => powers.scale(ka, exp.clone()),
            };
            let coef = lw.e.bind(coef);
            let at = lw.e.bind(add(mul(a, ei.clone()), j.clone()));
            let vj = Expr::load_array(vs, lw.e.bind(add(vrow.clone(), j.clone())));
            let value = Expr::mul_add(coef, vj, Expr::load_array(s, at.clone()));
            lw.e.push(Stmt::StoreArray { array: s, index: at, value });
        });
        lw.e.close(m, len.clone(), LoopKind::Serial);
        lw.e.close(ab, Expr::I64((d / sb) as i64), LoopKind::Serial);
    };

    match la.direction {
        Direction::Causal | Direction::Anticausal => {
            let reverse = la.direction == Direction::Anticausal;
            let (t, start, len) = chunks.open(lw, reverse);
            stage(lw, &start, &len, &[(q, qs, d, false), (k, kt, d, true), (v, vs, e, false)])?;
            let gate_carry = match gate {
                Some(ga) => Some(ga.fill(lw, &parts, &b_idx, (&start, &len), reverse)?),
                None => None,
            };
            let (ib, i0, rows) = open_blocks(lw, &len);
            // Scores w[r, m] = q_{i0+r}·k_m for the key columns the block attends to, 32
            // at a time: causal m < i0 + rows, anticausal m ≥ i0 (the columns of a block
            // past those a row attends to are computed and never read).
            let hi = if reverse { len.clone() } else { add(i0.clone(), rows.clone()) };
            let first = if reverse { lw.e.bind(div(i0.clone(), sci.clone())) } else { Expr::I64(0) };
            let last = lw.e.bind(div(add(hi, Expr::I64(SCORE_COLUMNS as i64 - 1)), sci.clone()));
            let tb = lw.e.open();
            let m0 = lw.e.bind(mul(add(first.clone(), Expr::Var(tb)), sci.clone()));
            rows_of(lw, rb, &sci, &mut |lw, r, l| {
                let at = lw.e.bind(add(add(mul(r.clone(), cpi.clone()), m0.clone()), l.clone()));
                lw.e.push(Stmt::StoreArray { array: w, index: at, value: Expr::F32(0.0) });
            });
            let a = lw.e.open();
            let krow = lw.e.bind(add(mul(Expr::Var(a), cpi.clone()), m0.clone()));
            rows_of(lw, rb, &sci, &mut |lw, r, l| {
                let i = lw.e.bind(add(i0.clone(), r.clone()));
                let qa = lw.e.bind(Expr::load_array(qs, add(mul(i, di.clone()), Expr::Var(a))));
                let kb = Expr::load_array(kt, lw.e.bind(add(krow.clone(), l.clone())));
                let at = lw.e.bind(add(add(mul(r.clone(), cpi.clone()), m0.clone()), l.clone()));
                let value = Expr::mul_add(qa, kb, Expr::load_array(w, at.clone()));
                lw.e.push(Stmt::StoreArray { array: w, index: at, value });
            });
            lw.e.close(a, di.clone(), LoopKind::Serial);
            lw.e.close(tb, sub(last.clone(), first.clone()), LoopKind::Serial);
            if let Some(ga) = gate {
                // Each score times its gates' factor (the columns a row does not attend
                // to get factors that may overflow: they are never read).
                let tb = lw.e.open();
                let m0 = lw.e.bind(mul(add(first.clone(), Expr::Var(tb)), sci.clone()));
                rows_of(lw, rb, &sci, &mut |lw, r, l| {
                    let i = lw.e.bind(add(i0.clone(), r.clone()));
                    let m = lw.e.bind(add(m0.clone(), l.clone()));
                    let at = lw.e.bind(add(mul(r.clone(), cpi.clone()), m.clone()));
                    let value = f(Binary::Mul, Expr::load_array(w, at.clone()), ga.score(i, m, reverse));
                    lw.e.push(Stmt::StoreArray { array: w, index: at, value });
                });
                lw.e.close(tb, sub(last, first), LoopKind::Serial);
            }
            // O = λ^{dist} q_i S + Σ_m λ^{|i−m|} w[i, m] v_m, m ascending: causal
            // dist(i) = i + 1, keys 0..i0 (every row of the block) then i0..=i;
            // anticausal dist(i) = len − i, keys i..i0 + rows then i0 + R..len.
            inter(lw, &i0, &|lw: &mut Lowering, i: &Expr| {
                if let Some(ga) = gate {
                    return Some(Expr::load_array(ga.inter, i.clone()));
                }
                // (max: rows past the end of an anticausal chunk would be negative)
                let dist = if reverse {
                    bin(Binary::Max, Expr::I64(0), sub(len.clone(), i.clone()))
                } else {
                    add(i.clone(), Expr::I64(1))
                };
                let dist = lw.e.bind(dist);
                powers.at(dist)
            });
            let triangle = |lw: &mut Lowering| {
                let r = lw.e.open();
                let rv = Expr::Var(r);
                let x = lw.e.open();
                let (m, exp) = if reverse {
                    (lw.e.bind(add(add(i0.clone(), rv.clone()), Expr::Var(x))), Expr::Var(x))
                } else {
                    (lw.e.bind(add(i0.clone(), Expr::Var(x))), lw.e.bind(sub(rv.clone(), Expr::Var(x))))
                };
                intra_term(lw, &rv, &m, exp);
                let count = if reverse { sub(rows.clone(), rv.clone()) } else { add(rv, Expr::I64(1)) };
                lw.e.close(x, count, LoopKind::Serial);
                lw.e.close(r, rbi.clone(), LoopKind::Serial);
            };
            let common = |lw: &mut Lowering| {
                let x = lw.e.open();
                let (m, count) = if reverse {
                    let beyond = bin(Binary::Max, Expr::I64(0), sub(sub(len.clone(), i0.clone()), rbi.clone()));
                    (lw.e.bind(add(add(i0.clone(), rbi.clone()), Expr::Var(x))), beyond)
                } else {
                    (Expr::Var(x), i0.clone())
                };
                let r = lw.e.open();
                let rv = Expr::Var(r);
                let exp = if reverse {
                    lw.e.bind(sub(m.clone(), add(i0.clone(), rv.clone())))
                } else {
                    lw.e.bind(sub(add(i0.clone(), rv.clone()), m.clone()))
                };
                intra_term(lw, &rv, &m, exp);
                lw.e.close(r, rbi.clone(), LoopKind::Serial);
                lw.e.close(x, count, LoopKind::Serial);
            };
            if reverse {
                triangle(lw);
                common(lw);
            } else {
                common(lw);
                triangle(lw);
            }
            store_rows(lw, &start, &i0, &rows)?;
            lw.e.close(ib, block_count(&len), LoopKind::Serial);
            update(lw, &len, reverse, gate_carry);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
        Direction::Full => {
            // S = Σ_m k_mᵀ v_m over the whole sequence, then o_n = q_n S.
            let (t, start, len) = chunks.open(lw, false);
            stage(lw, &start, &len, &[(k, kt, d, true), (v, vs, e, false)])?;
            update(lw, &len, false, None);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
            let (t, start, len) = chunks.open(lw, false);
            stage(lw, &start, &len, &[(q, qs, d, false)])?;
            let (ib, i0, rows) = open_blocks(lw, &len);
            inter(lw, &i0, &|_: &mut Lowering, _: &Expr| None);
            store_rows(lw, &start, &i0, &rows)?;
            lw.e.close(ib, block_count(&len), LoopKind::Serial);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
    }
    let extent = parts.batch_extent(lw)?;
    super::finish(lw, name, extent)
}
