//! The chunked linear-attention scan as a GPU block kernel: the algorithm of
//! `linear_attention.rs`, with one thread block per (batch index, tile of value columns)
//! and everything a chunk needs staged in shared memory.
//!
//! ```text
//! block (b, tile) of THREADS threads; value columns j0..j0+E_T of the tile:
//!   shared S[d×E_T] = 0;  P[k] = λ_b^k for k in 0..=C (decay only)
//!   for each chunk (in order; from the end when anticausal), uniform across the block:
//!     barrier
//!     stage   Q[len×d], K[len×(d+1)], V[len×E_T]      one element per thread and round
//!     barrier
//!     scores  W[i,m] = λ^{|i−m|} q_i·k_m, m ∈ dir(i)   one (i, m) per thread
//!     barrier
//!     output  o[i,j] = λ^{dist(i)} q_i·S[:,j] + Σ_m W[i,m] v[m,j]   one (i, j) per thread,
//!             stored to global memory (neighbouring threads, neighbouring columns)
//!     barrier
//!     update  S[a,j] ← λ^{len} S[a,j] + Σ_m λ^{w(m)} k[m,a] v[m,j]   one (a, j) per thread
//! ```
//!
//! Every phase deals its elements to the threads round by round (`element = round·T +
//! thread`, guarded by `element < count`), so each element has one owner and the
//! barriers between phases are the only synchronization. K's rows are padded to d + 1
//! floats: in the score phase neighbouring threads read neighbouring rows of K, which
//! would otherwise fall in one shared-memory bank. `Full` (never decayed) runs the update
//! phase over every chunk first, then the output phase with the final state.
//!
//! The value tile trades recomputation for shared memory: each block stages the chunk's
//! Q and K rows (evaluating their prologue regions) for its E_T columns. The chunk length
//! and E_T are chosen so that the shared arrays fit the 48 KB every block may declare
//! statically ([`tiles`]); arithmetic is f32 throughout.

use super::element::{elem_of, Lowering};
use super::emit::{add, bin, div, mul, rem, sub};
use super::linear_attention::{Chunks, Parts, Powers};
use super::threads::{deal, split, THREADS};
use crate::ir::{Direction, LinearAttention, NodeId};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};

/// Bytes of shared memory a block may declare statically.
pub const SHARED_LIMIT: usize = 48 * 1024;

/// The widest value tile: 64 columns keep a d = 128 state tile at 32 KB.
const MAX_TILE: usize = 64;

/// The shape of a block's work: tokens per chunk and value columns per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub chunk: usize,
    pub cols: usize,
}

impl Tiles {
    /// Floats of shared memory a block declares (see the module notes).
    pub fn shared_floats(self, d: usize, full: bool, decay: bool) -> usize {
        let Tiles { chunk: c, cols } = self;
        let scores = if full { 0 } else { c * c };
        let powers = if decay { c + 1 } else { 0 };
        d * cols + c * d + c * (d + 1) + c * cols + scores + powers
    }
}

/// The tiles for key width `d` and value width `e`, at most `max_chunk` tokens per
/// chunk: the widest value tile (a divisor of `e`) that still allows chunks of 16 tokens
/// (or `max_chunk`, if smaller), with the longest chunk that then fits; `None` when not
/// even one token fits.
pub fn tiles(d: usize, e: usize, max_chunk: usize, full: bool, decay: bool) -> Option<Tiles> {
    // Each of the (at most six) arrays starts 16-byte aligned.
    let fits = |t: Tiles| t.shared_floats(d, full, decay) * 4 + 6 * 16 <= SHARED_LIMIT;
    // Chunks of powers of two, longest first, up to `max_chunk`.
    let chunks: Vec<usize> = (0..=6).map(|p| 64usize >> p).filter(|&c| c <= max_chunk.max(1)).collect();
    let longest = |cols: usize| chunks.iter().map(|&chunk| Tiles { chunk, cols }).find(|&t| fits(t));
    let widths: Vec<usize> = (1..=e.min(MAX_TILE)).rev().filter(|&w| e.is_multiple_of(w)).collect();
    let wanted = chunks.iter().copied().find(|&c| c <= 16).unwrap_or(1);
    widths
        .iter()
        .filter_map(|&w| longest(w))
        .find(|t| t.chunk >= wanted)
        .or_else(|| widths.last().and_then(|&w| longest(w)))
}

/// The block kernel of linear attention node `n`; `None` when its shared arrays cannot
/// fit or the attention is gated (the caller then uses the one-thread-per-batch-index
/// kernel, which takes gates; the block kernel does not yet).
pub fn kernel(
    lw: &mut Lowering,
    n: NodeId,
    la: &LinearAttention,
    max_chunk: usize,
    name: String,
) -> Result<Option<(Kernel, Vec<usize>)>, String> {
    let parts = Parts::of(lw, n, la)?;
    if parts.gate.is_some() {
        return Ok(None);
    }
    let (d, e) = (parts.d, parts.e);
    let full = la.direction == Direction::Full;
    let Some(Tiles { chunk: c, cols: et }) = tiles(d, e, max_chunk, full, parts.lam.is_some()) else {
        return Ok(None);
    };
    let (di, ci, eti) = (Expr::I64(d as i64), Expr::I64(c as i64), Expr::I64(et as i64));
    let kw = Expr::I64(d as i64 + 1); // padded row of K

    // Shared arrays: the state tile, the chunk's staged rows, its scores, λ's powers.
    let s = lw.e.shared(d * et);
    let qs = lw.e.shared(c * d);
    let ks = lw.e.shared(c * (d + 1));
    let vs = lw.e.shared(c * et);
    let w = if full { None } else { Some(lw.e.shared(c * c)) };
    let pw = if parts.lam.is_some() { Some(lw.e.shared(c + 1)) } else { None };

    // Block → (batch index, value tile).
    let tiles_n = Expr::I64((e / et) as i64);
    let block = Expr::Var(lw.e.index);
    let flat = lw.e.bind(div(block.clone(), tiles_n.clone()));
    let j0 = lw.e.bind(mul(rem(block, tiles_n.clone()), eti.clone()));
    let b_idx = lw.unravel(flat, &parts.batch)?;
    let global = lw.stored[&n];
    let out = lw.e.buffer(global, &format!("b{global}"), elem_of(parts.out_ty.dtype), Access::Write);

    deal(lw, Expr::I64((d * et) as i64), |lw, x| {
        lw.e.push(Stmt::StoreArray { array: s, index: x, value: Expr::F32(0.0) });
        Ok(())
    })?;
    if let (Some(pw), Some(lam)) = (pw, parts.decay_at(lw, &b_idx)?) {
        deal(lw, Expr::I64(c as i64 + 1), |lw, x| {
            let value = bin(Binary::Pow, lam, Expr::Cast(Scalar::F32, Box::new(x.clone())));
            lw.e.push(Stmt::StoreArray { array: pw, index: x, value });
            Ok(())
        })?;
    }

    let powers = Powers(pw);
    let chunks = Chunks::new(lw, &parts.len_n, c);
    // Every chunk starts with a barrier: the previous chunk's reads of the staged arrays
    // are done before they are overwritten.
    let open_chunk = |lw: &mut Lowering, reverse: bool| -> (Var, Expr, Expr) {
        let opened = chunks.open(lw, reverse);
        lw.e.push(Stmt::Barrier);
        opened
    };
    // Stage the chunk's rows: Q and K (when `qk`), V's tile (when `vt`).
    let stage = |lw: &mut Lowering, start: &Expr, len: &Expr, qk: (bool, bool), vt: bool| -> Result<(), String> {
        if qk.0 || qk.1 {
            deal(lw, mul(len.clone(), di.clone()), |lw, x| {
                let (i, a) = split(lw, &x, &di);
                let mut idx = b_idx.clone();
                idx.extend([lw.e.bind(add(start.clone(), i.clone())), a.clone()]);
                if qk.0 {
                    let value = parts.q.at(lw, &idx)?;
                    lw.e.push(Stmt::StoreArray { array: qs, index: x, value });
                }
                if qk.1 {
                    let value = parts.k.at(lw, &idx)?;
                    let at = lw.e.bind(add(mul(i, kw.clone()), a));
                    lw.e.push(Stmt::StoreArray { array: ks, index: at, value });
                }
                Ok(())
            })?;
        }
        if vt {
            deal(lw, mul(len.clone(), eti.clone()), |lw, x| {
                let (i, j) = split(lw, &x, &eti);
                let mut idx = b_idx.clone();
                idx.extend([lw.e.bind(add(start.clone(), i)), lw.e.bind(add(j0.clone(), j))]);
                let value = parts.v.at(lw, &idx)?;
                lw.e.push(Stmt::StoreArray { array: vs, index: x, value });
                Ok(())
            })?;
        }
        lw.e.push(Stmt::Barrier);
        Ok(())
    };
    // `q_i · S[:, j]`.
    let inter = |lw: &mut Lowering, i: &Expr, j: &Expr| {
        let qrow = lw.e.bind(mul(i.clone(), di.clone()));
        lw.serial_sum(Expr::F32(0.0), di.clone(), |lw, a| {
            let qa = Expr::load_array(qs, lw.e.bind(add(qrow.clone(), a.clone())));
            let sa = Expr::load_array(s, lw.e.bind(add(mul(a, eti.clone()), j.clone())));
            bin(Binary::Mul, qa, sa)
        })
    };
    let store = |lw: &mut Lowering, pos: Expr, j: &Expr, value: Expr| -> Result<(), String> {
        let mut idx = b_idx.clone();
        idx.extend([pos, lw.e.bind(add(j0.clone(), j.clone()))]);
        let lin = lw.linear(&idx, &parts.out_ty.shape)?;
        lw.e.push(Stmt::Store { buffer: out, index: lin, value });
        Ok(())
    };
    // `S ← λ^{len} S + Σ_m λ^{w(m)} k_mᵀ v_m`, then a barrier.
    let update = |lw: &mut Lowering, len: &Expr, reverse: bool| -> Result<(), String> {
        deal(lw, Expr::I64((d * et) as i64), |lw, x| {
            let (a, j) = split(lw, &x, &eti);
            let old = Expr::load_array(s, x.clone());
            let old = match powers.at(len.clone()) {
                Some(p) => bin(Binary::Mul, old, p),
                None => old,
            };
            let new = lw.serial_sum(old, len.clone(), |lw, m| {
                let ka = Expr::load_array(ks, lw.e.bind(add(mul(m.clone(), kw.clone()), a.clone())));
                let vj = Expr::load_array(vs, lw.e.bind(add(mul(m.clone(), eti.clone()), j.clone())));
                let exp = if reverse { m } else { lw.e.bind(sub(sub(len.clone(), Expr::I64(1)), m)) };
                bin(Binary::Mul, powers.scale(ka, exp), vj)
            });
            lw.e.push(Stmt::StoreArray { array: s, index: x, value: new });
            Ok(())
        })?;
        lw.e.push(Stmt::Barrier);
        Ok(())
    };

    match (la.direction, w) {
        (Direction::Causal | Direction::Anticausal, Some(w)) => {
            let reverse = la.direction == Direction::Anticausal;
            let (t, start, len) = open_chunk(lw, reverse);
            stage(lw, &start, &len, (true, true), true)?;
            // Scores of the pairs (i, m) with m in dir(i): causal m ≤ i, anticausal m ≥ i.
            deal(lw, mul(len.clone(), len.clone()), |lw, x| {
                let (i, m) = split(lw, &x, &len);
                let (lo, hi) = if reverse { (i.clone(), m.clone()) } else { (m.clone(), i.clone()) };
                let at = lw.e.open_if(add(mul(i.clone(), ci.clone()), m.clone()));
                let krow = lw.e.bind(mul(m.clone(), kw.clone()));
                let qrow = lw.e.bind(mul(i.clone(), di.clone()));
                let dot = lw.serial_sum(Expr::F32(0.0), di.clone(), |lw, a| {
                    let qa = Expr::load_array(qs, lw.e.bind(add(qrow.clone(), a.clone())));
                    let kb = Expr::load_array(ks, lw.e.bind(add(krow.clone(), a)));
                    bin(Binary::Mul, qa, kb)
                });
                let distance = lw.e.bind(sub(hi.clone(), lo.clone()));
                lw.e.push(Stmt::StoreArray { array: w, index: Expr::Var(at), value: powers.scale(dot, distance) });
                lw.e.close_if(bin(Binary::Le, lo, hi));
                Ok(())
            })?;
            lw.e.push(Stmt::Barrier);
            // Outputs: causal m = y ∈ 0..=i, the state i + 1 steps away; anticausal
            // m = i + y, y ∈ 0..len − i, the state len − i steps away.
            deal(lw, mul(len.clone(), eti.clone()), |lw, x| {
                let (i, j) = split(lw, &x, &eti);
                let count = lw.e.bind(if reverse { sub(len.clone(), i.clone()) } else { add(i.clone(), Expr::I64(1)) });
                let state = inter(lw, &i, &j);
                let state = lw.e.bind(powers.scale(state, count.clone()));
                let wrow = lw.e.bind(mul(i.clone(), ci.clone()));
                let value = lw.serial_sum(state, count, |lw, y| {
                    let m = if reverse { lw.e.bind(add(i.clone(), y)) } else { y };
                    let wm = Expr::load_array(w, lw.e.bind(add(wrow.clone(), m.clone())));
                    let vj = Expr::load_array(vs, lw.e.bind(add(mul(m, eti.clone()), j.clone())));
                    bin(Binary::Mul, wm, vj)
                });
                let pos = lw.e.bind(add(start.clone(), i));
                store(lw, pos, &j, value)
            })?;
            lw.e.push(Stmt::Barrier);
            update(lw, &len, reverse)?;
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
        _ => {
            // S = Σ_m k_mᵀ v_m over the whole sequence, then o_n = q_n S.
            let (t, start, len) = open_chunk(lw, false);
            stage(lw, &start, &len, (false, true), true)?;
            update(lw, &len, false)?;
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
            let (t, start, len) = open_chunk(lw, false);
            stage(lw, &start, &len, (true, false), false)?;
            deal(lw, mul(len, eti.clone()), |lw, x| {
                let (i, j) = split(lw, &x, &eti);
                let value = inter(lw, &i, &j);
                let pos = lw.e.bind(add(start.clone(), i));
                store(lw, pos, &j, value)
            })?;
            lw.e.close(t, chunks.count.clone(), LoopKind::Serial);
        }
    }
    let extent = mul(parts.batch_extent(lw)?, tiles_n);
    let (mut kernel, bindings) = super::finish(lw, name, extent)?;
    kernel.threads = Some(THREADS);
    Ok(Some((kernel, bindings)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_static_shared_memory() {
        // d = e = 128 (TransNormerLLM's heads): 32 value columns, chunks of 16 tokens.
        assert_eq!(tiles(128, 128, 64, false, true), Some(Tiles { chunk: 16, cols: 32 }));
        // d = e = 64: the whole value width, chunks of 32.
        assert_eq!(tiles(64, 64, 64, false, false), Some(Tiles { chunk: 32, cols: 64 }));
        // Small heads take the longest chunk asked for.
        assert_eq!(tiles(8, 8, 64, false, false), Some(Tiles { chunk: 64, cols: 8 }));
        assert_eq!(tiles(8, 8, 5, false, false), Some(Tiles { chunk: 4, cols: 8 }));
        for (d, e) in [(128, 128), (64, 64), (256, 256), (96, 48)] {
            let t = tiles(d, e, 64, false, true).unwrap();
            assert!(t.shared_floats(d, false, true) * 4 + 6 * 16 <= SHARED_LIMIT, "{d}×{e}: {t:?}");
            assert_eq!(e % t.cols, 0);
        }
        // Too wide for one token's rows.
        assert_eq!(tiles(8192, 64, 64, false, false), None);
    }
}
