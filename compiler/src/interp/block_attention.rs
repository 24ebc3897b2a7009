//! Reference evaluation of block attention and its backward, by the definitions in
//! `ir/normal_form.rs`: batched matrix products around the regions, in two ways:
//! naively (`EvalOptions::chunk` = None: each product's sum runs over the whole block at
//! once), and chunked (`Some(C)`: every product is accumulated chunk by chunk of C
//! positions along its summed axis, a partial product per chunk added into the result,
//! the way a tiled kernel accumulates). Both must agree to rounding for any C.

use super::linear_attention::eval_region;
use super::tensor::Tensor;
use super::EvalOptions;
use crate::ir::{BlockAttention, BlockAttentionGrad};
use std::collections::HashMap;

/// `[batch…, rows, cols]` viewed as (batch count, rows, cols).
fn mat(t: &Tensor) -> (usize, usize, usize) {
    let r = t.rank();
    (t.shape[..r - 2].iter().product(), t.shape[r - 2], t.shape[r - 1])
}

/// Batched `a · b` (`ta`, `tb` transpose the operands first), the sum over the shared
/// axis taken whole (`chunk` None) or as partial sums of `chunk` terms added in order.
fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool, chunk: Option<usize>) -> Tensor {
    let (batch, ar, ac) = mat(a);
    let (_, br, bc) = mat(b);
    let (i_n, k_n) = if ta { (ac, ar) } else { (ar, ac) };
    let j_n = if tb { br } else { bc };
    let mut shape = a.shape[..a.rank() - 2].to_vec();
    shape.extend([i_n, j_n]);
    let mut out = Tensor::zeros(shape);
    for x in 0..batch {
        let (ao, bo, oo) = (x * ar * ac, x * br * bc, x * i_n * j_n);
        let step = chunk.unwrap_or(k_n).max(1);
        for start in (0..k_n).step_by(step) {
            let end = (start + step).min(k_n);
            for i in 0..i_n {
                for j in 0..j_n {
                    let mut s = 0.0;
                    for k in start..end {
                        let av = if ta { a.data[ao + k * ac + i] } else { a.data[ao + i * ac + k] };
                        let bv = if tb { b.data[bo + j * bc + k] } else { b.data[bo + k * bc + j] };
                        s += av * bv;
                    }
                    out.data[oo + i * j_n + j] += s;
                }
            }
        }
    }
    out
}

struct Forward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scores: Tensor,
    weights: Tensor,
}

fn forward(
    ba: &BlockAttention,
    args: &[&Tensor],
    symbols: &HashMap<String, i64>,
    opts: &EvalOptions,
) -> Result<Forward, String> {
    let (qa, ka, va) = ba.split(args);
    let q = eval_region(&ba.q, qa, symbols, opts)?;
    let k = eval_region(&ba.k, ka, symbols, opts)?;
    let v = eval_region(&ba.v, va, symbols, opts)?;
    let scores = bmm(&q, &k, false, true, opts.chunk);
    let weights = eval_region(&ba.weights, &[&scores], symbols, opts)?;
    Ok(Forward { q, k, v, scores, weights })
}

pub fn eval(
    ba: &BlockAttention,
    args: &[&Tensor],
    symbols: &HashMap<String, i64>,
    opts: &EvalOptions,
) -> Result<Tensor, String> {
    let f = forward(ba, args, symbols, opts)?;
    Ok(bmm(&f.weights, &f.v, false, false, opts.chunk))
}

pub fn eval_grad(
    bg: &BlockAttentionGrad,
    args: &[&Tensor],
    symbols: &HashMap<String, i64>,
    opts: &EvalOptions,
) -> Result<Tensor, String> {
    let n = bg.forward.operand_count();
    let f = forward(&bg.forward, &args[..n], symbols, opts)?;
    let d_o = args[n];
    let dv = bmm(&f.weights, d_o, true, false, opts.chunk);
    let dp = bmm(d_o, &f.v, false, true, opts.chunk);
    let ds = eval_region(&bg.weights_vjp, &[&f.scores, &dp], symbols, opts)?;
    let dq = bmm(&ds, &f.k, false, false, opts.chunk);
    let dk = bmm(&ds, &f.q, true, false, opts.chunk);
    super::shape::concat(&[&dq, &dk, &dv], dq.rank() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic `[2, rows, cols]` tensor.
    fn t(rows: usize, cols: usize, salt: u64) -> Tensor {
        let data = (0..2 * rows * cols).map(|i| tnc_bundle::rng::normal(salt, 3, i as u64, 0)).collect();
        Tensor::new(vec![2, rows, cols], data).unwrap()
    }

    #[test]
    fn chunked_products_match_the_naive_ones_for_every_chunk_size() {
        // The block products: S = q kᵀ, O = P v, dV = Pᵀ dO, dK = dSᵀ q (w = 9, d = 5).
        let (q, k, p) = (t(9, 5, 1), t(9, 5, 2), t(9, 9, 3));
        for (a, b, ta, tb) in [(&q, &k, false, true), (&p, &q, false, false), (&p, &q, true, false)] {
            let naive = bmm(a, b, ta, tb, None);
            for c in [1, 7, 9, 64] {
                let chunked = bmm(a, b, ta, tb, Some(c));
                assert_eq!(naive.shape, chunked.shape);
                let worst = naive.data.iter().zip(&chunked.data).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-12, "chunk {c}: differs by {worst}");
            }
        }
        // And the naive product is the definition: S[0, 1, 2] = Σ_x q[0, 1, x] k[0, 2, x].
        let s = bmm(&q, &k, false, true, None);
        let want: f64 = (0..5).map(|x| q.data[5 + x] * k.data[2 * 5 + x]).sum();
        assert!((s.data[9 + 2] - want).abs() < 1e-12);
    }
}
