//! Reference evaluation of the cross-entropy normal form (`ir/cross_entropy.rs`), in two
//! independent ways: naively (each token's whole row of V logits, max-shifted logsumexp)
//! and by the chunked algorithm the kernels use, sweeping the vocabulary in chunks of C
//! words with an online logsumexp (running max `m` and running sum `s = Σ exp(z − m)`,
//! rescaled by `exp(m_old − m_new)` whenever the max grows), so that no row of V logits
//! is ever held. Tests run both with C = 1, 7 and ≥ V against the primitive spelling.
//!
//! - loss: one sweep; `ℓ = m + log s − z_y`.
//! - dx: one sweep carrying, besides `m` and `s`, the running `a = Σ exp(z_v − m) E_v`
//!   (rescaled with `s`), so `Σ_v p_v E_v = a / s` at the end.
//! - dE: two sweeps, as kernels do it: the first gives each token's `lse`, the second
//!   visits each vocabulary chunk once and adds `g_t (p_tv − [y_t = v]) x_t` to its rows.

use super::tensor::Tensor;
use crate::ir::cross_entropy::{CeOp, CrossEntropy};

/// The operands, viewed as flat token rows.
struct View<'a> {
    x: &'a [f64],
    table: &'a Tensor,
    transposed: bool,
    targets: Vec<usize>,
    g: Option<&'a [f64]>,
    /// With 16-bit operands: rounds `P = g·(p − onehot)` before the gradients' products.
    round: Option<fn(f32) -> f32>,
    t: usize,
    v: usize,
    d: usize,
}

impl View<'_> {
    /// Element `k` of the table's row for word `w`.
    #[inline]
    fn e(&self, w: usize, k: usize) -> f64 {
        if self.transposed {
            self.table.data[k * self.v + w]
        } else {
            self.table.data[w * self.d + k]
        }
    }

    fn xrow(&self, t: usize) -> &[f64] {
        &self.x[t * self.d..(t + 1) * self.d]
    }

    /// The logit `x_t · E_w`.
    fn z(&self, t: usize, w: usize) -> f64 {
        self.xrow(t).iter().enumerate().map(|(k, &xk)| xk * self.e(w, k)).sum()
    }

    fn g(&self, t: usize) -> f64 {
        self.g.map_or(1.0, |g| g[t])
    }

    /// `P_tv = g_t (p_tv − [y_t = v])` rounded to the operands' type (16-bit operands).
    fn rounded_p(&self, t: usize, v: usize, lse: f64, round: fn(f32) -> f32) -> f64 {
        let hit = if v == self.targets[t] { 1.0 } else { 0.0 };
        round((self.g(t) * ((self.z(t, v) - lse).exp() - hit)) as f32) as f64
    }
}

fn view<'a>(
    ce: &CrossEntropy,
    x: &'a Tensor,
    table: &'a Tensor,
    targets: &'a Tensor,
    (g, round): (Option<&'a Tensor>, Option<fn(f32) -> f32>),
) -> Result<View<'a>, String> {
    if table.rank() != 2 || x.rank() == 0 {
        return Err(format!(
            "cross-entropy needs a rank-2 table and hidden states of rank ≥ 1, got {:?} and {:?}",
            table.shape, x.shape
        ));
    }
    let (v, d) = if ce.transposed { (table.shape[1], table.shape[0]) } else { (table.shape[0], table.shape[1]) };
    let (&xd, tokens) = x.shape.split_last().expect("rank ≥ 1");
    if xd != d || targets.shape != tokens || g.is_some_and(|g| g.shape != tokens) {
        return Err(format!(
            "cross-entropy shapes do not agree: x {:?}, table {:?}{}, targets {:?}",
            x.shape,
            table.shape,
            if ce.transposed { " (transposed)" } else { "" },
            targets.shape
        ));
    }
    let mut ys = Vec::with_capacity(targets.numel());
    for (pos, &y) in targets.data.iter().enumerate() {
        if !(y >= 0.0 && y < v as f64) {
            return Err(format!("cross-entropy target {y} at flat position {pos} is out of range for {v} words"));
        }
        ys.push(y as usize);
    }
    let g = g.map(|g| &g.data[..]);
    Ok(View { x: &x.data, table, transposed: ce.transposed, t: ys.len(), targets: ys, g, round, v, d })
}

/// Evaluate one of the three ops. `g` is the loss cotangent (the backward ops' fourth
/// operand), `round` the rounding of 16-bit operands (`None` for f32), which the
/// gradients' products read `P` rounded by; `chunk`: `None` naively, `Some(C)` by
/// vocabulary chunks of C words.
pub fn eval(
    ce: &CrossEntropy,
    which: CeOp,
    x: &Tensor,
    table: &Tensor,
    targets: &Tensor,
    (g, round): (Option<&Tensor>, Option<fn(f32) -> f32>),
    chunk: Option<usize>,
) -> Result<Tensor, String> {
    if matches!(which, CeOp::Loss | CeOp::Correct) != g.is_none() {
        return Err("the cross-entropy backward ops (only) take a loss cotangent".into());
    }
    let w = view(ce, x, table, targets, (g, round))?;
    let tokens = targets.shape.clone();
    Ok(match (which, chunk) {
        (CeOp::Loss, None) => {
            Tensor { shape: tokens, data: (0..w.t).map(|t| naive_lse(&w, t) - w.z(t, w.targets[t])).collect() }
        }
        (CeOp::Loss, Some(c)) => Tensor {
            shape: tokens,
            data: (0..w.t).map(|t| online_lse(&w, t, c.max(1)) - w.z(t, w.targets[t])).collect(),
        },
        (CeOp::GradX, c) => grad_x(&w, c, x.shape.clone()),
        (CeOp::GradTable, c) => grad_table(&w, c, table.shape.clone()),
        (CeOp::Correct, _) => Tensor { shape: tokens, data: (0..w.t).map(|t| correct(&w, t)).collect() },
    })
}

/// 1 when the target's logit is a largest one of token `t`'s row, else 0.
fn correct(w: &View, t: usize) -> f64 {
    let zy = w.z(t, w.targets[t]);
    let best = (0..w.v).map(|v| w.z(t, v)).fold(f64::NEG_INFINITY, f64::max);
    if zy >= best {
        1.0
    } else {
        0.0
    }
}

/// `log Σ_w exp(z_tw)` from the whole row, shifted by its max.
fn naive_lse(w: &View, t: usize) -> f64 {
    let z: Vec<f64> = (0..w.v).map(|v| w.z(t, v)).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + z.iter().map(|&zv| (zv - m).exp()).sum::<f64>().ln()
}

/// Online logsumexp over chunks of `c` words: only one chunk's logits at a time.
fn online_lse(w: &View, t: usize, c: usize) -> f64 {
    let (mut m, mut s) = (f64::NEG_INFINITY, 0.0);
    for start in (0..w.v).step_by(c) {
        let z: Vec<f64> = (start..(start + c).min(w.v)).map(|v| w.z(t, v)).collect();
        let m_new = z.iter().copied().fold(m, f64::max);
        s = if s == 0.0 { 0.0 } else { s * (m - m_new).exp() };
        s += z.iter().map(|&zv| (zv - m_new).exp()).sum::<f64>();
        m = m_new;
    }
    m + s.ln()
}

/// `g_t (Σ_v p_tv E_v − E_{y_t})` (with 16-bit operands `Σ_v P_tv E_v`, `P` rounded).
fn grad_x(w: &View, chunk: Option<usize>, shape: Vec<usize>) -> Tensor {
    let mut out = Tensor::zeros(shape);
    if let Some(round) = w.round {
        for t in 0..w.t {
            let lse = naive_lse(w, t);
            let p: Vec<f64> = (0..w.v).map(|v| w.rounded_p(t, v, lse, round)).collect();
            for k in 0..w.d {
                out.data[t * w.d + k] = (0..w.v).map(|v| p[v] * w.e(v, k)).sum();
            }
        }
        return out;
    }
    for t in 0..w.t {
        // `mean[k] = Σ_v p_tv E_vk`.
        let mean: Vec<f64> = match chunk {
            None => {
                let lse = naive_lse(w, t);
                let p: Vec<f64> = (0..w.v).map(|v| (w.z(t, v) - lse).exp()).collect();
                (0..w.d).map(|k| (0..w.v).map(|v| p[v] * w.e(v, k)).sum()).collect()
            }
            Some(c) => {
                let c = c.max(1);
                let (mut m, mut s) = (f64::NEG_INFINITY, 0.0);
                let mut a = vec![0.0; w.d];
                for start in (0..w.v).step_by(c) {
                    let words = start..(start + c).min(w.v);
                    let z: Vec<f64> = words.clone().map(|v| w.z(t, v)).collect();
                    let m_new = z.iter().copied().fold(m, f64::max);
                    let rescale = if s == 0.0 { 0.0 } else { (m - m_new).exp() };
                    s *= rescale;
                    a.iter_mut().for_each(|ak| *ak *= rescale);
                    for (v, &zv) in words.zip(&z) {
                        let e = (zv - m_new).exp();
                        s += e;
                        for (k, ak) in a.iter_mut().enumerate() {
                            *ak += e * w.e(v, k);
                        }
                    }
                    m = m_new;
                }
                a.into_iter().map(|ak| ak / s).collect()
            }
        };
        let (gt, y) = (w.g(t), w.targets[t]);
        for (k, mk) in mean.iter().enumerate() {
            out.data[t * w.d + k] = gt * (mk - w.e(y, k));
        }
    }
    out
}

/// `dE_v = Σ_t g_t (p_tv − [y_t = v]) x_t`, in the table's layout (with 16-bit operands
/// `Σ_t P_tv x_t`, `P` rounded).
fn grad_table(w: &View, chunk: Option<usize>, shape: Vec<usize>) -> Tensor {
    let mut out = Tensor::zeros(shape);
    let (v_count, d) = (w.v, w.d);
    let mut add = |v: usize, coef: f64, xt: &[f64]| {
        for (k, &xk) in xt.iter().enumerate() {
            let i = if w.transposed { k * v_count + v } else { v * d + k };
            out.data[i] += coef * xk;
        }
    };
    if let Some(round) = w.round {
        for t in 0..w.t {
            let lse = naive_lse(w, t);
            for v in 0..v_count {
                add(v, w.rounded_p(t, v, lse, round), w.xrow(t));
            }
        }
        return out;
    }
    match chunk {
        None => {
            for t in 0..w.t {
                let lse = naive_lse(w, t);
                for v in 0..v_count {
                    let hit = if v == w.targets[t] { 1.0 } else { 0.0 };
                    add(v, w.g(t) * ((w.z(t, v) - lse).exp() - hit), w.xrow(t));
                }
            }
        }
        Some(c) => {
            let c = c.max(1);
            // Sweep 1: each token's logsumexp, online over the chunks.
            let lse: Vec<f64> = (0..w.t).map(|t| online_lse(w, t, c)).collect();
            // Sweep 2: each vocabulary chunk once; its rows get every token's share.
            for start in (0..v_count).step_by(c) {
                for (t, &lse_t) in lse.iter().enumerate() {
                    for v in start..(start + c).min(v_count) {
                        let hit = if v == w.targets[t] { 1.0 } else { 0.0 };
                        add(v, w.g(t) * ((w.z(t, v) - lse_t).exp() - hit), w.xrow(t));
                    }
                }
            }
        }
    }
    out
}
