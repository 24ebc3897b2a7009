//! Reference evaluation of the linear-attention normal form, in two independent ways:
//! naively (the quadratic sum over every pair of positions) and by the chunked algorithm
//! the kernels use (inside a chunk of C tokens the masked quadratic form, across chunks a
//! d×e running state). Tests run both with C = 1, 7 and ≥ N, so the chunk math is proven
//! before any code generation.

use super::tensor::Tensor;
use crate::ir::{Direction, Graph, LinearAttention, Region};
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

/// The decay of each flattened batch index, broadcasting size-1 axes of λ.
fn decays(lambda: Option<&Tensor>, batch_shape: &[usize]) -> Vec<f64> {
    let count: usize = batch_shape.iter().product();
    let Some(l) = lambda else { return vec![1.0; count] };
    (0..count)
        .map(|flat| {
            let mut rem = flat;
            let mut idx = 0;
            let mut stride = 1;
            for (axis, &size) in batch_shape.iter().enumerate().rev() {
                let i = rem % size;
                rem /= size;
                let ls = l.shape[axis];
                idx += if ls == 1 { 0 } else { i } * stride;
                stride *= ls;
            }
            l.data[idx]
        })
        .collect()
}

/// Evaluate with the naive quadratic sum (`chunk = None`) or by chunks of `chunk` tokens.
pub fn eval(
    la: &LinearAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lambda: Option<&Tensor>,
    chunk: Option<usize>,
) -> Result<Tensor, String> {
    let (batch, n, d) = dims(q);
    let e = v.shape[v.rank() - 1];
    if k.shape != q.shape || v.shape[..v.rank() - 1] != q.shape[..q.rank() - 1] {
        return Err(format!("linear attention shapes {:?}, {:?}, {:?} do not agree", q.shape, k.shape, v.shape));
    }
    let lams = decays(lambda, &q.shape[..q.rank() - 2]);
    let mut out = Tensor::zeros(v.shape.clone());
    for b in 0..batch {
        let qb = &q.data[b * n * d..(b + 1) * n * d];
        let kb = &k.data[b * n * d..(b + 1) * n * d];
        let vb = &v.data[b * n * e..(b + 1) * n * e];
        let ob = &mut out.data[b * n * e..(b + 1) * n * e];
        let one = |dir: Direction, ob: &mut [f64]| match chunk {
            None => naive(dir, qb, kb, vb, ob, n, d, e, lams[b]),
            Some(c) => chunked(dir, qb, kb, vb, ob, n, d, e, lams[b], c.max(1)),
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

/// Accumulates into `o`: `o_n += Σ_{m ∈ dir(n)} λ^{|n−m|} (q_n·k_m) v_m`.
#[allow(clippy::too_many_arguments)]
fn naive(dir: Direction, q: &[f64], k: &[f64], v: &[f64], o: &mut [f64], n: usize, d: usize, e: usize, lam: f64) {
    for i in 0..n {
        let range = match dir {
            Direction::Causal => 0..i + 1,
            Direction::Anticausal => i..n,
            Direction::Full => 0..n,
        };
        for m in range {
            let w = lam.powi((i as i64 - m as i64).unsigned_abs() as i32)
                * dot(&q[i * d..(i + 1) * d], &k[m * d..(m + 1) * d]);
            for j in 0..e {
                o[i * e + j] += w * v[m * e + j];
            }
        }
    }
}

/// The chunked algorithm. Causal: chunks in order; the state `S = Σ_{m < start} λ^{start−1−m}
/// k_m v_mᵀ` (d×e) carries everything before the chunk; within the chunk the masked
/// quadratic form. Anticausal mirrors it from the end.
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
    lam: f64,
    c: usize,
) {
    let mut state = vec![0.0; d * e];
    let chunks: Vec<usize> = (0..n.div_ceil(c)).collect();
    let order: Vec<usize> = if dir == Direction::Anticausal { chunks.into_iter().rev().collect() } else { chunks };
    for ci in order {
        let (start, end) = (ci * c, ((ci + 1) * c).min(n));
        for i in start..end {
            // Inter-chunk: the state, decayed from the chunk boundary to position i.
            let dist = if dir == Direction::Anticausal { end - i } else { i - start + 1 };
            let scale = lam.powi(dist as i32);
            let qi = &q[i * d..(i + 1) * d];
            for j in 0..e {
                let s: f64 = (0..d).map(|a| qi[a] * state[a * e + j]).sum();
                o[i * e + j] += scale * s;
            }
            // Intra-chunk: the masked quadratic form.
            let range = if dir == Direction::Anticausal { i..end } else { start..i + 1 };
            for m in range {
                let w = lam.powi((i as i64 - m as i64).unsigned_abs() as i32) * dot(qi, &k[m * d..(m + 1) * d]);
                for j in 0..e {
                    o[i * e + j] += w * v[m * e + j];
                }
            }
        }
        // Carry the state past this chunk: decay it by the chunk length, add the chunk.
        let len = (end - start) as i32;
        let carry = lam.powi(len);
        for s in state.iter_mut() {
            *s *= carry;
        }
        for m in start..end {
            let dist = if dir == Direction::Anticausal { m - start } else { end - 1 - m };
            let w = lam.powi(dist as i32);
            for a in 0..d {
                for j in 0..e {
                    state[a * e + j] += w * k[m * d + a] * v[m * e + j];
                }
            }
        }
    }
}
