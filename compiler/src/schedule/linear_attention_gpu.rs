//! The chunked linear-attention scan as a GPU block kernel: the algorithm of
//! `linear_attention.rs`, with one thread block per (batch index, tile of value columns)
//! and everything a chunk needs staged in shared memory.
//!
//! ```text
//! block (b, tile) of THREADS threads; value columns j0..j0+E_T of the tile:
//!   shared S[d×E_T] = 0;  P[k] = λ_b^k for k in 0..=C (constant decay only)
//!   for each chunk (in order; from the end when anticausal), uniform across the block:
//!     barrier
//!     stage   Q[len×d], K[len×(d+1)], V[len×E_T]      one element per thread and round
//!     barrier
//!     gates   b[i] = Σ_{j≤i} a_{start+j}               (gated only: one i per thread)
//!             barrier; inter[i], update[i] from b (as on CPUs); barrier
//!     scores  W[i,m] = λ^{|i−m|} q_i·k_m, m ∈ dir(i)   one (i, m) per thread
//!             (gated: e^{±(b_i − b_m)} instead of λ^{|i−m|})
//!     barrier
//!     output  o[i,j] = λ^{dist(i)} q_i·S[:,j] + Σ_m W[i,m] v[m,j]   one (i, j) per thread,
//!             stored to global memory (neighbouring threads, neighbouring columns)
//!             (gated: inter[i] instead of λ^{dist(i)})
//!     barrier
//!     update  S[a,j] ← λ^{len} S[a,j] + Σ_m λ^{w(m)} k[m,a] v[m,j]   one (a, j) per thread
//!             (gated: e^{b_{len−1}} and update[m])
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
//! statically ([`tiles`]); arithmetic is f32 throughout, the cumulative log-gates too
//! (sums inside one chunk only, exponentiated as differences: no product of gates can
//! underflow to 0 and then be divided by).

use super::element::{elem_of, Lowering};
use super::emit::{add, bin, div, mul, rem, sub};
use super::linear_attention::{exp, gate_factors, gate_score, Chunks, Parts, Powers};
use super::threads::{deal, split, THREADS};
use crate::ir::{Direction, LinearAttention, NodeId};
use crate::kernel::{Access, Binary, Expr, Kernel, LoopKind, Scalar, Stmt, Var};

/// Bytes of shared memory a block may declare statically.
pub const SHARED_LIMIT: usize = 48 * 1024;

/// Bytes lost to aligning each of at most eight shared arrays to 16 bytes.
const ALIGNMENT_SLACK: usize = 8 * 16;

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
    pub fn shared_floats(self, d: usize, full: bool, decay: ChunkDecay) -> usize {
        let Tiles { chunk: c, cols } = self;
        let scores = if full { 0 } else { c * c };
        let decay = match decay {
            ChunkDecay::None => 0,
            ChunkDecay::Constant => c + 1,
            ChunkDecay::Gated => 3 * c,
        };
        d * cols + c * d + c * (d + 1) + c * cols + scores + decay
    }
}

/// What a block stages for the decay: nothing, λ's powers, or a chunk's gate factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkDecay {
    None,
    Constant,
    Gated,
}

/// The decay's shared arrays.
#[derive(Clone, Copy)]
enum DecayArrays {
    Powers(Powers),
    /// Cumulative log-gates of the chunk, and the factors on `q_i S` and on `k_mᵀ v_m`.
    Gates {
        cum: Var,
        inter: Var,
        update: Var,
    },
}

impl DecayArrays {
    /// The factor of score (i, m), `lo ≤ hi` being the earlier and later of the two.
    fn score(self, dot: Expr, (i, m): (&Expr, &Expr), (lo, hi): (&Expr, &Expr), reverse: bool) -> Expr {
        match self {
            DecayArrays::Powers(p) => p.scale(dot, sub(hi.clone(), lo.clone())),
            DecayArrays::Gates { cum, .. } => bin(Binary::Mul, dot, gate_score(cum, i.clone(), m.clone(), reverse)),
        }
    }

    /// `q_i S` times the factor of row i, whose state is `count` steps away.
    fn inter(self, state: Expr, i: &Expr, count: Expr) -> Expr {
        match self {
            DecayArrays::Powers(p) => p.scale(state, count),
            DecayArrays::Gates { inter, .. } => bin(Binary::Mul, state, Expr::load_array(inter, i.clone())),
        }
    }

    /// The old state's factor in a chunk of `len` tokens (none: 1).
    fn carry(self, len: &Expr) -> Option<Expr> {
        match self {
            DecayArrays::Powers(p) => p.at(len.clone()),
            DecayArrays::Gates { cum, .. } => Some(exp(Expr::load_array(cum, sub(len.clone(), Expr::I64(1))))),
        }
    }

    /// `k_m` times its factor in the update, key m being `steps` from the chunk's end.
    fn key(self, k: Expr, m: &Expr, steps: Expr) -> Expr {
        match self {
            DecayArrays::Powers(p) => p.scale(k, steps),
            DecayArrays::Gates { update, .. } => bin(Binary::Mul, k, Expr::load_array(update, m.clone())),
        }
    }
}

/// The tiles for key width `d` and value width `e`, at most `max_chunk` tokens per
/// chunk: the widest value tile (a divisor of `e`) that still allows chunks of 16 tokens
/// (or `max_chunk`, if smaller), with the longest chunk that then fits; `None` when not
/// even one token fits.
pub fn tiles(d: usize, e: usize, max_chunk: usize, full: bool, decay: ChunkDecay) -> Option<Tiles> {
    // Each of the (at most eight) arrays starts 16-byte aligned.
    let fits = |t: Tiles| t.shared_floats(d, full, decay) * 4 + ALIGNMENT_SLACK <= SHARED_LIMIT;
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
/// fit (the caller then uses the one-thread-per-batch-index kernel).
pub fn kernel(
    lw: &mut Lowering,
    n: NodeId,
    la: &LinearAttention,
    max_chunk: usize,
    name: String,
) -> Result<Option<(Kernel, Vec<usize>)>, String> {
    let parts = Parts::of(lw, n, la)?;
    let (d, e) = (parts.d, parts.e);
    let full = la.direction == Direction::Full;
    let decay_kind = match (parts.lam.is_some(), parts.gate.is_some()) {
        (_, true) => ChunkDecay::Gated,
        (true, false) => ChunkDecay::Constant,
        (false, false) => ChunkDecay::None,
    };
    let Some(Tiles { chunk: c, cols: et }) = tiles(d, e, max_chunk, full, decay_kind) else {
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
    let pw = if decay_kind == ChunkDecay::Constant { Some(lw.e.shared(c + 1)) } else { None };
    let decay = match decay_kind {
        ChunkDecay::Gated => DecayArrays::Gates { cum: lw.e.shared(c), inter: lw.e.shared(c), update: lw.e.shared(c) },
        _ => DecayArrays::Powers(Powers(pw)),
    };

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
    // A gated chunk's factors (after `stage`'s barrier): the cumulative log-gates, then
    // from them the factors on `q_i S` and `k_mᵀ v_m`, each phase closed by a barrier.
    let fill_gates = |lw: &mut Lowering, start: &Expr, len: &Expr, reverse: bool| -> Result<(), String> {
        let DecayArrays::Gates { cum, inter, update } = decay else { return Ok(()) };
        deal(lw, len.clone(), |lw, i| {
            // b_i = Σ_{j ≤ i} a_{start+j}, in order.
            let upto = lw.e.bind(add(i.clone(), Expr::I64(1)));
            let sum = lw.e.accumulator(lw.e.depth(), Scalar::F32, Expr::F32(0.0));
            let j = lw.e.open();
            let pos = lw.e.bind(add(start.clone(), Expr::Var(j)));
            let a = parts.log_gate_at(lw, &b_idx, pos)?.expect("a gated attention");
            lw.e.push(Stmt::Assign { var: sum, value: bin(Binary::Add, Expr::Var(sum), a) });
            lw.e.close(j, upto, LoopKind::Serial);
            lw.e.push(Stmt::StoreArray { array: cum, index: i, value: Expr::Var(sum) });
            Ok(())
        })?;
        lw.e.push(Stmt::Barrier);
        deal(lw, len.clone(), |lw, m| {
            let last = Expr::load_array(cum, sub(len.clone(), Expr::I64(1)));
            let cm = lw.e.bind(Expr::load_array(cum, m.clone()));
            let (to_query, to_key) = gate_factors(last, cm, reverse);
            lw.e.push(Stmt::StoreArray { array: inter, index: m.clone(), value: to_query });
            lw.e.push(Stmt::StoreArray { array: update, index: m, value: to_key });
            Ok(())
        })?;
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
            let old = match decay.carry(len) {
                Some(p) => bin(Binary::Mul, old, p),
                None => old,
            };
            let new = lw.serial_sum(old, len.clone(), |lw, m| {
                let ka = Expr::load_array(ks, lw.e.bind(add(mul(m.clone(), kw.clone()), a.clone())));
                let vj = Expr::load_array(vs, lw.e.bind(add(mul(m.clone(), eti.clone()), j.clone())));
                let steps = if reverse { m.clone() } else { lw.e.bind(sub(sub(len.clone(), Expr::I64(1)), m.clone())) };
                bin(Binary::Mul, decay.key(ka, &m, steps), vj)
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
            fill_gates(lw, &start, &len, reverse)?;
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
                let value = decay.score(dot, (&i, &m), (&lo, &hi), reverse);
                lw.e.push(Stmt::StoreArray { array: w, index: Expr::Var(at), value });
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
                let state = lw.e.bind(decay.inter(state, &i, count.clone()));
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
        assert_eq!(tiles(128, 128, 64, false, ChunkDecay::Constant), Some(Tiles { chunk: 16, cols: 32 }));
        // d = e = 64: the whole value width, chunks of 32.
        assert_eq!(tiles(64, 64, 64, false, ChunkDecay::None), Some(Tiles { chunk: 32, cols: 64 }));
        // Small heads take the longest chunk asked for.
        assert_eq!(tiles(8, 8, 64, false, ChunkDecay::None), Some(Tiles { chunk: 64, cols: 8 }));
        assert_eq!(tiles(8, 8, 5, false, ChunkDecay::None), Some(Tiles { chunk: 4, cols: 8 }));
        for (d, e) in [(128, 128), (64, 64), (256, 256), (96, 48)] {
            for decay in [ChunkDecay::None, ChunkDecay::Constant, ChunkDecay::Gated] {
                let t = tiles(d, e, 64, false, decay).unwrap();
                assert!(t.shared_floats(d, false, decay) * 4 + ALIGNMENT_SLACK <= SHARED_LIMIT, "{d}×{e}: {t:?}");
                assert_eq!(e % t.cols, 0);
            }
        }
        // A gated d = e = 128 head keeps the tiles of a constant decay.
        assert_eq!(tiles(128, 128, 64, false, ChunkDecay::Gated), Some(Tiles { chunk: 16, cols: 32 }));
        // Too wide for one token's rows.
        assert_eq!(tiles(8192, 64, 64, false, ChunkDecay::None), None);
    }
}
