//! The one generic chunked-scan kernel of the linear-attention normal form
//! (`ir::LinearAttention`), for every direction, with or without decay, whatever prologue
//! regions the op carries (Lightning Attention, arXiv 2401.04658):
//!
//! ```text
//! parallel b over the flattened batch axes (batch, heads):
//!   S[d×e] = 0 (f32);  P[k] = λ_b^k for k in 0..=C (decay only)
//!   for each chunk of C tokens (in order; from the end when anticausal):
//!     stage q', k' (len×d) and v' (len×e) of the chunk into local arrays, evaluating
//!       the regions once per element
//!     for each row i of the chunk:
//!       W[m] = λ^{|i−m|} q_i·k_m for m ∈ dir(i) inside the chunk   (intra-chunk scores)
//!       O[:] = λ^{dist(i)} q_i S + Σ_m W[m] v_m                     (inter + intra)
//!       out[b, start + i, :] = O
//!     S ← λ^{len} S + Σ_m λ^{w(m)} k_mᵀ v_m                         (carry the state)
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
//! (`C·(2d + e) + d·e + e + 2C + 1` floats).
//!
//! Every product is written with a contiguous innermost loop and no loop-carried sum, so
//! that it vectorizes: k' is staged transposed (`kᵀ[a·C + m]`), so the scores of row i are
//! `W[m] += q_i[a] · kᵀ[a, m]` for each a in turn (the same order of terms per score as a
//! dot product, which would be a serial chain of d dependent additions).

use super::element::{elem_of, Lowering, Source};
use super::emit::{add, bin, div, mul, sub};
use crate::ir::{Direction, LinearAttention, NodeId, Region};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};
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
        let lam = if la.decay { Some(ops[na + nb + nc]) } else { None };
        if la.direction == Direction::Full && lam.is_some() {
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
        let lt = lw.g.ty(l).clone();
        let at: Vec<Expr> = lt
            .shape
            .iter()
            .zip(b_idx)
            .map(|(dim, i)| if dim.as_const() == Some(1) { Expr::I64(0) } else { i.clone() })
            .collect();
        lw.value(Source::Node(l), &at).map(Some)
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

/// The chunked kernel of linear attention node `n`, with chunks of `chunk` tokens.
pub fn kernel(
    lw: &mut Lowering,
    n: NodeId,
    la: &LinearAttention,
    chunk: usize,
    name: String,
) -> Result<(Kernel, Vec<usize>), String> {
    let c = chunk.max(1);
    let parts = Parts::of(lw, n, la)?;
    let Parts { q, k, v, out_ty, batch, len_n, d, e, .. } = &parts;
    let (d, e) = (*d, *e);
    let (di, ei) = (Expr::I64(d as i64), Expr::I64(e as i64));

    let b_idx = lw.unravel(Expr::Var(lw.e.index), batch)?;
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), elem_of(out_ty.dtype), Access::Write);

    // Local arrays: the state, the chunk's staged rows, one row of scores and of output,
    // and the powers of the decay.
    let s = lw.e.array(d * e);
    let qs = lw.e.array(c * d);
    // Transposed: kt[a·C + m].
    let kt = lw.e.array(c * d);
    let vs = lw.e.array(c * e);
    let w = lw.e.array(c);
    let o = lw.e.array(e);
    let pw = match parts.decay_at(lw, &b_idx)? {
        Some(lam) => {
            let pw = lw.e.array(c + 1);
            let p = lw.e.open();
            let value = f(Binary::Pow, lam, Expr::Cast(Scalar::F32, Box::new(Expr::Var(p))));
            lw.e.push(Stmt::StoreArray { array: pw, index: Expr::Var(p), value });
            lw.e.close(p, Expr::I64(c as i64 + 1), LoopKind::Serial);
            Some(pw)
        }
        None => None,
    };
    let powers = Powers(pw);
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
                lw.e.bind(add(mul(Expr::Var(a), Expr::I64(c as i64)), Expr::Var(i)))
            } else {
                lw.e.bind(add(row, Expr::Var(a)))
            };
            lw.e.push(Stmt::StoreArray { array: arr, index: at, value });
            lw.e.close(a, Expr::I64(wdt as i64), LoopKind::Vector);
        }
        lw.e.close(i, len.clone(), LoopKind::Serial);
        Ok(())
    };
    // Set `o[:]` to `scale · q_i S` for staged row `i` (`scale = None`: 1).
    let inter = |lw: &mut Lowering, i: &Expr, scale: Option<Expr>| {
        let j = lw.e.open();
        lw.e.push(Stmt::StoreArray { array: o, index: Expr::Var(j), value: Expr::F32(0.0) });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
        let a = lw.e.open();
        let qa = Expr::load_array(qs, lw.e.bind(add(mul(i.clone(), di.clone()), Expr::Var(a))));
        let qa = match scale {
            Some(sc) => f(Binary::Mul, qa, sc),
            None => qa,
        };
        let srow = lw.e.bind(mul(Expr::Var(a), ei.clone()));
        let j = lw.e.open();
        let sv = Expr::load_array(s, lw.e.bind(add(srow, Expr::Var(j))));
        let old = Expr::load_array(o, Expr::Var(j));
        lw.e.push(Stmt::StoreArray {
            array: o,
            index: Expr::Var(j),
            value: f(Binary::Add, old, f(Binary::Mul, qa, sv)),
        });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
        lw.e.close(a, di.clone(), LoopKind::Serial);
    };
    // Store `o[:]` as the output row at position `pos`.
    let store_row = |lw: &mut Lowering, pos: &Expr| -> Result<(), String> {
        let j = lw.e.open();
        let mut idx = b_idx.clone();
        idx.extend([pos.clone(), Expr::Var(j)]);
        let lin = lw.linear(&idx, &out_ty.shape)?;
        lw.e.push(Stmt::Store { buffer: out, index: lin, value: Expr::load_array(o, Expr::Var(j)) });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
        Ok(())
    };
    // `S ← λ^{len} S + Σ_m λ^{w(m)} k_mᵀ v_m` over the staged chunk.
    let update = |lw: &mut Lowering, len: &Expr, reverse: bool| {
        let a = lw.e.open();
        let srow = lw.e.bind(mul(Expr::Var(a), ei.clone()));
        if let Some(carry) = powers.at(len.clone()) {
            let j = lw.e.open();
            let at = lw.e.bind(add(srow.clone(), Expr::Var(j)));
            lw.e.push(Stmt::StoreArray {
                array: s,
                index: at.clone(),
                value: f(Binary::Mul, Expr::load_array(s, at), carry),
            });
            lw.e.close(j, ei.clone(), LoopKind::Vector);
        }
        let m = lw.e.open();
        let ka = Expr::load_array(kt, lw.e.bind(add(mul(Expr::Var(a), Expr::I64(c as i64)), Expr::Var(m))));
        let exp = if reverse { Expr::Var(m) } else { lw.e.bind(sub(sub(len.clone(), Expr::I64(1)), Expr::Var(m))) };
        let coef = powers.scale(ka, exp);
        let vrow = lw.e.bind(mul(Expr::Var(m), ei.clone()));
        let j = lw.e.open();
        let at = lw.e.bind(add(srow, Expr::Var(j)));
        let vj = Expr::load_array(vs, lw.e.bind(add(vrow, Expr::Var(j))));
        let value = f(Binary::Add, Expr::load_array(s, at.clone()), f(Binary::Mul, coef, vj));
        lw.e.push(Stmt::StoreArray { array: s, index: at, value });
        lw.e.close(j, ei.clone(), LoopKind::Vector);
        lw.e.close(m, len.clone(), LoopKind::Serial);
        lw.e.close(a, di.clone(), LoopKind::Serial);
    };

    match la.direction {
        Direction::Causal | Direction::Anticausal => {
            let reverse = la.direction == Direction::Anticausal;
            let (t, start, len) = chunks.open(lw, reverse);
            stage(lw, &start, &len, &[(q, qs, d, false), (k, kt, d, true), (v, vs, e, false)])?;
            let i = lw.e.open();
            let iv = Expr::Var(i);
            // Intra-chunk scores W[m] = λ^{|i−m|} q_i·k_m for m ∈ dir(i) in the chunk:
            // causal m = x ∈ 0..=i, the state `i + 1` steps away; anticausal m = i + x,
            // x ∈ 0..len − i, the state `len − i` steps away.
            let count = lw.e.bind(if reverse { sub(len.clone(), iv.clone()) } else { add(iv.clone(), Expr::I64(1)) });
            let m_of = |lw: &mut Lowering, x: Var| {
                if reverse {
                    lw.e.bind(add(iv.clone(), Expr::Var(x)))
                } else {
                    Expr::Var(x)
                }
            };
            // W[m] = 0;  W[m] += q_i[a] · kᵀ[a, m] for a = 0 … d − 1;  W[m] *= λ^{|i−m|}.
            let x = lw.e.open();
            let m = m_of(lw, x);
            lw.e.push(Stmt::StoreArray { array: w, index: m, value: Expr::F32(0.0) });
            lw.e.close(x, count.clone(), LoopKind::Vector);
            let qrow = lw.e.bind(mul(iv.clone(), di.clone()));
            let a = lw.e.open();
            let qa = lw.e.bind(Expr::load_array(qs, add(qrow, Expr::Var(a))));
            let krow = lw.e.bind(mul(Expr::Var(a), Expr::I64(c as i64)));
            let x = lw.e.open();
            let m = m_of(lw, x);
            let kb = Expr::load_array(kt, add(krow, m.clone()));
            let value = f(Binary::Add, Expr::load_array(w, m.clone()), f(Binary::Mul, qa, kb));
            lw.e.push(Stmt::StoreArray { array: w, index: m, value });
            lw.e.close(x, count.clone(), LoopKind::Vector);
            lw.e.close(a, di.clone(), LoopKind::Serial);
            if powers.0.is_some() {
                let x = lw.e.open();
                let m = m_of(lw, x);
                let exp = if reverse { Expr::Var(x) } else { lw.e.bind(sub(iv.clone(), Expr::Var(x))) };
                let value = powers.scale(Expr::load_array(w, m.clone()), exp);
                lw.e.push(Stmt::StoreArray { array: w, index: m, value });
                lw.e.close(x, count.clone(), LoopKind::Vector);
            }
            // O = λ^{dist} q_i S + Σ_m W[m] v_m.
            inter(lw, &iv, powers.at(count.clone()));
            let x = lw.e.open();
            let m = m_of(lw, x);
            let wm = Expr::load_array(w, m.clone());
            let vrow = lw.e.bind(mul(m, ei.clone()));
            let j = lw.e.open();
            let vj = Expr::load_array(vs, lw.e.bind(add(vrow, Expr::Var(j))));
            let old = Expr::load_array(o, Expr::Var(j));
            lw.e.push(Stmt::StoreArray {
                array: o,
                index: Expr::Var(j),
                value: f(Binary::Add, old, f(Binary::Mul, wm, vj)),
            });
            lw.e.close(j, ei.clone(), LoopKind::Vector);
            lw.e.close(x, count, LoopKind::Serial);
            let pos = lw.e.bind(add(start.clone(), iv));
            store_row(lw, &pos)?;
            lw.e.close(i, len.clone(), LoopKind::Serial);
            update(lw, &len, reverse);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
        Direction::Full => {
            // S = Σ_m k_mᵀ v_m over the whole sequence, then o_n = q_n S.
            let (t, start, len) = chunks.open(lw, false);
            stage(lw, &start, &len, &[(k, kt, d, true), (v, vs, e, false)])?;
            update(lw, &len, false);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
            let (t, start, len) = chunks.open(lw, false);
            stage(lw, &start, &len, &[(q, qs, d, false)])?;
            let i = lw.e.open();
            inter(lw, &Expr::Var(i), None);
            let pos = lw.e.bind(add(start, Expr::Var(i)));
            store_row(lw, &pos)?;
            lw.e.close(i, len, LoopKind::Serial);
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
    }
    let extent = parts.batch_extent(lw)?;
    super::finish(lw, name, extent)
}
