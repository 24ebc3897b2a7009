//! Reference evaluation of the linear-attention normal form, in two independent ways:
//! naively (the quadratic sum over every pair of positions) and by the chunked algorithm
//! the kernels use (inside a chunk of C tokens the masked quadratic form, across chunks a
//! d×e running state). Tests run both with C = 1, 7 and ≥ N, so the chunk math is proven
//! before any code generation.

use super::tensor::Tensor;
use crate::ir::{Decay, Direction, Graph, LinearAttention, Region, LOG_GATE_FLOOR};
use std::collections::HashMap;

/// Evaluate a region on tensors (through a temporary graph and the interpreter).
pub fn eval_region(
    r: &Region,
    args: &[&Tensor],
    symbols: &HashMap<String, i64>,
    opts: &super::EvalOptions,
) -> Result<Tensor, String> {
    if r.is_identity() {
        return Ok(args[0].clone());
    }
    let mut g = Graph::new("region");
    let ids: Vec<_> = r.args.iter().enumerate().map(|(i, t)| g.add_input(format!("a{i}"), t.clone(), None)).collect();
    let out = r.inline(&mut g, &ids, None)?;
    g.add_output("out", out);
    let inputs: HashMap<String, Tensor> =
        args.iter().enumerate().map(|(i, t)| (format!("a{i}"), (*t).clone())).collect();
    let sub = super::EvalOptions { symbols: symbols.clone(), ..opts.clone() };
    let e = super::evaluate(&g, &inputs, &[], &sub)?;
    e.get(out).cloned().ok_or_else(|| "region result missing".into())
}

/// `[batch…, N, d]` viewed as (batch count, N, d).
fn dims(t: &Tensor) -> (usize, usize, usize) {
    let r = t.rank();
    let (n, d) = (t.shape[r - 2], t.shape[r - 1]);
    (t.shape[..r - 2].iter().product(), n, d)
}

/// The decay's operand for each flattened batch index, broadcasting its size-1 axes:
/// `per` values each (1 for λ, N log-gates for a gate).
fn per_batch(t: &Tensor, batch_shape: &[usize], per: usize) -> Vec<Vec<f64>> {
    let count: usize = batch_shape.iter().product();
    (0..count)
        .map(|flat| {
            let mut rem = flat;
            let mut idx = 0;
            let mut stride = 1;
            for (axis, &size) in batch_shape.iter().enumerate().rev() {
                let i = rem % size;
                rem /= size;
                let ls = t.shape[axis];
                idx += if ls == 1 { 0 } else { i } * stride;
                stride *= ls;
            }
            t.data[idx * per..(idx + 1) * per].to_vec()
        })
        .collect()
}

/// The weight `w(n, m)` of one batch index: see [`crate::ir::Decay`].
#[derive(Clone)]
enum Weight {
    Const(f64),
    /// The log-gates, floored.
    Gate(Vec<f64>),
}

impl Weight {
    /// Every pair from scratch: `λ^{|i−m|}`, or the exp of the gates' sum over
    /// `(min, max]`, added up term by term (not from cumulative sums, which is how the
    /// chunked form and the kernels get it).
    fn between(&self, i: usize, m: usize) -> f64 {
        let (lo, hi) = (i.min(m), i.max(m));
        match self {
            Weight::Const(l) => l.powi((hi - lo) as i32),
            Weight::Gate(a) => a[lo + 1..=hi].iter().sum::<f64>().exp(),
        }
    }
}

/// Evaluate with the naive quadratic sum (`chunk = None`) or by chunks of `chunk` tokens.
pub fn eval(
    la: &LinearAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decay: Option<&Tensor>,
    chunk: Option<usize>,
) -> Result<Tensor, String> {
    let (batch, n, d) = dims(q);
    let e = v.shape[v.rank() - 1];
    if k.shape != q.shape || v.shape[..v.rank() - 1] != q.shape[..q.rank() - 1] {
        return Err(format!("linear attention shapes {:?}, {:?}, {:?} do not agree", q.shape, k.shape, v.shape));
    }
    let batch_shape = &q.shape[..q.rank() - 2];
    let weights: Vec<Weight> = match (la.decay, decay) {
        (Decay::PerHead, Some(l)) => per_batch(l, batch_shape, 1).into_iter().map(|x| Weight::Const(x[0])).collect(),
        (Decay::PerToken, Some(a)) => per_batch(a, batch_shape, n)
            .into_iter()
            .map(|g| Weight::Gate(g.into_iter().map(|x| x.max(LOG_GATE_FLOOR)).collect()))
            .collect(),
        _ => vec![Weight::Const(1.0); batch],
    };
    let mut out = Tensor::zeros(v.shape.clone());
    for b in 0..batch {
        let qb = &q.data[b * n * d..(b + 1) * n * d];
        let kb = &k.data[b * n * d..(b + 1) * n * d];
        let vb = &v.data[b * n * e..(b + 1) * n * e];
        let ob = &mut out.data[b * n * e..(b + 1) * n * e];
        let wb = &weights[b];
        let one = |dir: Direction, ob: &mut [f64]| match chunk {
            None => naive(dir, qb, kb, vb, ob, n, d, e, wb),
            Some(c) => chunked(dir, qb, kb, vb, ob, n, d, e, wb, c.max(1)),
        };
        match la.direction {
            Direction::Causal | Direction::Anticausal => one(la.direction, ob),
            Direction::Full => {
                // Both halves, minus the diagonal counted twice.
                one(Direction::Causal, ob);
                one(Direction::Anticausal, ob);
                for i in 0..n {
                    let w = dot(&qb[i * d..(i + 1) * d], &kb[i * d..(i + 1) * d]);
                    for j in 0..e {
                        ob[i * e + j] -= w * vb[i * e + j];
                    }
                }
            }
        }
    }
    Ok(out)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Accumulates into `o`: `o_n += Σ_{m ∈ dir(n)} w(n, m) (q_n·k_m) v_m`.
#[allow(clippy::too_many_arguments)]
fn naive(dir: Direction, q: &[f64], k: &[f64], v: &[f64], o: &mut [f64], n: usize, d: usize, e: usize, wt: &Weight) {
    for i in 0..n {
        let range = match dir {
            Direction::Causal => 0..i + 1,
            Direction::Anticausal => i..n,
            Direction::Full => 0..n,
        };
        for m in range {
            let w = wt.between(i, m) * dot(&q[i * d..(i + 1) * d], &k[m * d..(m + 1) * d]);
            for j in 0..e {
                o[i * e + j] += w * v[m * e + j];
            }
        }
    }
}

/// The factors the chunked form applies inside one chunk of `len` tokens (positions
/// relative to its start), as the kernels compute them.
struct ChunkFactors {
    /// Row i's factor on `q_i S` (the state).
    inter: Vec<f64>,
    /// Key m's factor on `k_mᵀ v_m` when it is added to the state.
    update: Vec<f64>,
    /// The state's factor when it is carried past the chunk.
    carry: f64,
    /// `w(i, m)` inside the chunk.
    intra: Vec<f64>,
}

impl ChunkFactors {
    /// Constant λ: causal `λ^{i+1}`, `λ^{len−1−m}`; anticausal `λ^{len−i}`, `λ^m`, the
    /// state carried by `λ^{len}`. A gate, with `b` the chunk's inclusive cumulative
    /// log-gates: causal `exp(b_i)`, `exp(b_{len−1} − b_m)`, inside `exp(b_i − b_m)`;
    /// anticausal (its state counts the gate of the position after the chunk too)
    /// `exp(b_{len−1} − b_i)`, `exp(b_m)`, inside `exp(b_m − b_i)`; carried by
    /// `exp(b_{len−1})`. Every exponent of a gate ≤ 1 is ≤ 0: nothing overflows.
    fn new(wt: &Weight, reverse: bool, start: usize, len: usize) -> ChunkFactors {
        match wt {
            Weight::Const(l) => {
                let p = |x: usize| l.powi(x as i32);
                ChunkFactors {
                    inter: (0..len).map(|i| p(if reverse { len - i } else { i + 1 })).collect(),
                    update: (0..len).map(|m| p(if reverse { m } else { len - 1 - m })).collect(),
                    carry: p(len),
                    intra: (0..len * len).map(|x| p((x / len).abs_diff(x % len))).collect(),
                }
            }
            Weight::Gate(a) => {
                let b: Vec<f64> = a[start..start + len]
                    .iter()
                    .scan(0.0, |acc, x| {
                        *acc += x;
                        Some(*acc)
                    })
                    .collect();
                let last = b[len - 1];
                let sign = if reverse { -1.0 } else { 1.0 };
                ChunkFactors {
                    inter: (0..len).map(|i| if reverse { (last - b[i]).exp() } else { b[i].exp() }).collect(),
                    update: (0..len).map(|m| if reverse { b[m].exp() } else { (last - b[m]).exp() }).collect(),
                    carry: last.exp(),
                    intra: (0..len * len).map(|x| (sign * (b[x / len] - b[x % len])).exp()).collect(),
                }
            }
        }
    }
}

/// The chunked algorithm. Causal: chunks in order; the state (d×e) carries every key
/// before the chunk, weighted to the position before it; within the chunk the masked
/// quadratic form. Anticausal mirrors it from the end. The factors: [`ChunkFactors`].
#[allow(clippy::too_many_arguments)]
fn chunked(
    dir: Direction,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    o: &mut [f64],
    n: usize,
    d: usize,
    e: usize,
    wt: &Weight,
    c: usize,
) {
    let mut state = vec![0.0; d * e];
    let reverse = dir == Direction::Anticausal;
    let chunks: Vec<usize> = (0..n.div_ceil(c)).collect();
    let order: Vec<usize> = if reverse { chunks.into_iter().rev().collect() } else { chunks };
    for ci in order {
        let (start, end) = (ci * c, ((ci + 1) * c).min(n));
        let len = end - start;
        let f = ChunkFactors::new(wt, reverse, start, len);
        for i in start..end {
            // Inter-chunk: the state, decayed from the chunk boundary to position i.
            let scale = f.inter[i - start];
            let qi = &q[i * d..(i + 1) * d];
            for j in 0..e {
                let s: f64 = (0..d).map(|a| qi[a] * state[a * e + j]).sum();
                o[i * e + j] += scale * s;
            }
            // Intra-chunk: the masked quadratic form.
            let range = if reverse { i..end } else { start..i + 1 };
            for m in range {
                let w = f.intra[(i - start) * len + (m - start)] * dot(qi, &k[m * d..(m + 1) * d]);
                for j in 0..e {
                    o[i * e + j] += w * v[m * e + j];
                }
            }
        }
        // Carry the state past this chunk, then add the chunk's keys.
        for s in state.iter_mut() {
            *s *= f.carry;
        }
        for m in start..end {
            let w = f.update[m - start];
            for a in 0..d {
                for j in 0..e {
                    state[a * e + j] += w * k[m * d + a] * v[m * e + j];
                }
            }
        }
    }
}
