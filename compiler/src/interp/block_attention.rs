//! Reference evaluation of block attention and its backward, by the definitions in
//! `ir/normal_form.rs`: plain batched matrix products around the regions.

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

/// Batched `a · bᵀ` (`ta`, `tb` transpose the operands first): `[.., i, k] · [.., j, k]ᵀ`.
fn bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Tensor {
    let (batch, ar, ac) = mat(a);
    let (_, br, bc) = mat(b);
    let (i_n, k_n) = if ta { (ac, ar) } else { (ar, ac) };
    let j_n = if tb { br } else { bc };
    let mut shape = a.shape[..a.rank() - 2].to_vec();
    shape.extend([i_n, j_n]);
    let mut out = Tensor::zeros(shape);
    for x in 0..batch {
        let (ao, bo, oo) = (x * ar * ac, x * br * bc, x * i_n * j_n);
        for i in 0..i_n {
            for j in 0..j_n {
                let mut s = 0.0;
                for k in 0..k_n {
                    let av = if ta { a.data[ao + k * ac + i] } else { a.data[ao + i * ac + k] };
                    let bv = if tb { b.data[bo + j * bc + k] } else { b.data[bo + k * bc + j] };
                    s += av * bv;
                }
                out.data[oo + i * j_n + j] = s;
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
    let scores = bmm(&q, &k, false, true);
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
    Ok(bmm(&f.weights, &f.v, false, false))
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
    let dv = bmm(&f.weights, d_o, true, false);
    let dp = bmm(d_o, &f.v, false, true);
    let ds = eval_region(&bg.weights_vjp, &[&f.scores, &dp], symbols, opts)?;
    let dq = bmm(&ds, &f.k, false, false);
    let dk = bmm(&ds, &f.q, true, false);
    super::shape::concat(&[&dq, &dk, &dv], dq.rank() - 1)
}
