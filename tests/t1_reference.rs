//! TransNormer T1 (`models/transnormer_t1.tn`) against an independent reference.
//!
//! The reference below is written from the block formulas (../shared/TRANSNORMER.md and
//! DESIGN.md) as plain f64 loops over rows and channels: it builds no IR and calls no
//! interpreter code, so the interpreter's forward pass of the elaborated model is checked
//! against the math itself. At a tiny size (vocab 32, width 16, 2 heads, 2 layers — one
//! DiagAttention layer with blocks of 4 and one NormAttention layer —, GLU width 24),
//! with every parameter perturbed so that biases are non-zero, the loss, the logits and
//! the final normalized hidden states must agree to 1e-10 in f64.

mod common;

use common::*;
use std::collections::HashMap;
use tnc_compiler::interp::{compare, evaluate, init_params, EvalOptions, Tensor};
use tnc_compiler::ir::{Graph, NodeId, Op};
use tnc_runtime::rng;

const VOCAB: usize = 32;
const DIM: usize = 16;
const HEADS: usize = 2;
const LAYERS: usize = 2;
const GLU: usize = 24;
const BLOCK: usize = 4;
const TOL: f64 = 1e-10;

fn sets() -> Vec<String> {
    [
        format!("vocab={VOCAB}"),
        format!("dim={DIM}"),
        format!("heads={HEADS}"),
        format!("layers={LAYERS}"),
        format!("glu_dim={GLU}"),
        format!("block={BLOCK}"),
        "drop=0.0".to_string(),
    ]
    .to_vec()
}

fn t1_graph() -> Graph {
    let (_, g) = elaborate_path(&repo().join("models/transnormer_t1.tn"), &sets());
    g.unwrap_or_else(|d| panic!("transnormer_t1: {}", d.message))
}

/// Initial values (seed 3), then every tensor — biases, θ and the Householder buffer
/// included — plus deterministic noise, so that no term of the formulas is trivially 0.
fn perturbed_params(g: &Graph) -> Vec<Tensor> {
    let mut ps = init_params(g, 3).unwrap();
    for (info, t) in g.params.iter().zip(&mut ps) {
        let stream = rng::stable_hash(&format!("t1_reference/{}", info.name));
        for (i, x) in t.data.iter_mut().enumerate() {
            *x += 0.1 * rng::normal(17, stream, i as u64, 0);
        }
    }
    ps
}

fn tokens(b: usize, n: usize) -> Vec<Vec<usize>> {
    let stream = rng::stable_hash(&format!("t1_reference/tokens/{b}x{n}"));
    (0..b)
        .map(|i| {
            (0..n)
                .map(|j| ((rng::uniform(1, stream, (i * n + j) as u64, 0) * VOCAB as f64) as usize).min(VOCAB - 1))
                .collect()
        })
        .collect()
}

// ------------------------------------------------------------------------ the reference

type Rows = Vec<Vec<f64>>;

/// Parameters by name, checked against the expected shapes.
struct Params(HashMap<String, Tensor>);

impl Params {
    fn get(&self, name: &str, shape: &[usize]) -> &[f64] {
        let t = self.0.get(name).unwrap_or_else(|| panic!("no parameter `{name}`; have {:?}", self.names()));
        assert_eq!(t.shape, shape, "parameter `{name}`");
        &t.data
    }

    fn names(&self) -> Vec<&String> {
        let mut v: Vec<_> = self.0.keys().collect();
        v.sort();
        v
    }
}

/// `x W + b` for every row, `W` stored row-major as `[inp, out]`.
fn linear(x: &Rows, w: &[f64], b: &[f64], inp: usize, out: usize) -> Rows {
    x.iter()
        .map(|row| {
            assert_eq!(row.len(), inp);
            (0..out).map(|j| b[j] + (0..inp).map(|i| row[i] * w[i * out + j]).sum::<f64>()).collect()
        })
        .collect()
}

/// SRMSNorm: `x / (‖x‖₂ / √d + 1e-8)`, no gain.
fn srms(row: &[f64]) -> Vec<f64> {
    let d = row.len() as f64;
    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
    let den = norm / d.sqrt() + 1e-8;
    row.iter().map(|v| v / den).collect()
}

fn elu(v: f64) -> f64 {
    if v > 0.0 {
        v
    } else {
        v.exp() - 1.0
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// LRPE (v1): the Householder reflection `x − 2 (x·u) u` with the unit vector `u`, then
/// the rotation of each channel pair `(x_2i, x_2i+1)` by the angle `t θ_i`.
fn lrpe(x: &[f64], theta: &[f64], u: &[f64], t: f64) -> Vec<f64> {
    let xu = dot(x, u);
    let r: Vec<f64> = x.iter().zip(u).map(|(xi, ui)| xi - 2.0 * xu * ui).collect();
    let mut out = vec![0.0; x.len()];
    for i in 0..x.len() / 2 {
        let (c, s) = ((t * theta[i]).cos(), (t * theta[i]).sin());
        let (e, o) = (r[2 * i], r[2 * i + 1]);
        out[2 * i] = e * c - o * s;
        out[2 * i + 1] = e * s + o * c;
    }
    out
}

/// Channels of head `h` of a row of width `DIM`.
fn head(row: &[f64], h: usize) -> &[f64] {
    let e = DIM / HEADS;
    &row[h * e..(h + 1) * e]
}

/// The LRPE parameters of an attention layer: θ, and the Householder buffer made unit.
fn lrpe_params<'a>(p: &'a Params, prefix: &str) -> (&'a [f64], Vec<f64>) {
    let e = DIM / HEADS;
    let theta = p.get(&format!("{prefix}.lrpe.theta"), &[e / 2]);
    let hh = p.get(&format!("{prefix}.lrpe.householder"), &[e]);
    let n = hh.iter().map(|v| v * v).sum::<f64>().sqrt();
    (theta, hh.iter().map(|v| v / n).collect())
}

/// The shared projections of both attentions: q, k, v with biases.
fn qkv(p: &Params, prefix: &str, x: &Rows) -> (Rows, Rows, Rows) {
    let proj = |w: &str, b: &str| {
        let w = p.get(&format!("{prefix}.{w}"), &[DIM, DIM]);
        let b = p.get(&format!("{prefix}.{b}"), &[DIM]);
        linear(x, w, b, DIM, DIM)
    };
    (proj("wq", "bq"), proj("wk", "bk"), proj("wv", "bv"))
}

/// Concatenated heads `o[h][n]` → rows, SRMSNorm over the full width, then `Wo + bo`.
fn output(p: &Params, prefix: &str, o: &[Rows]) -> Rows {
    let n = o[0].len();
    let merged: Rows = (0..n).map(|i| srms(&(0..HEADS).flat_map(|h| o[h][i].clone()).collect::<Vec<_>>())).collect();
    let wo = p.get(&format!("{prefix}.wo"), &[DIM, DIM]);
    let bo = p.get(&format!("{prefix}.bo"), &[DIM]);
    linear(&merged, wo, bo, DIM, DIM)
}

/// DiagAttention (T1): within non-overlapping blocks of `BLOCK` tokens, causal inside a
/// block; q scaled by e^-½; LRPE with positions counted inside the block; scores through
/// ReLU, masked ones 0; no denominator. A sequence that does not fill its last block is
/// the same as one zero-padded to a multiple of the block: padded keys are never at or
/// before a real query.
fn diag_attention(p: &Params, prefix: &str, x: &Rows) -> Rows {
    let e = DIM / HEADS;
    let (q, k, v) = qkv(p, prefix, x);
    let (theta, u) = lrpe_params(p, prefix);
    let scale = (e as f64).powf(-0.5);
    let o: Vec<Rows> = (0..HEADS)
        .map(|h| {
            (0..x.len())
                .map(|i| {
                    let start = i / BLOCK * BLOCK;
                    let qh: Vec<f64> = head(&q[i], h).iter().map(|a| a * scale).collect();
                    let qi = lrpe(&qh, theta, &u, (i - start) as f64);
                    let mut out = vec![0.0; e];
                    for j in start..=i {
                        let kj = lrpe(head(&k[j], h), theta, &u, (j - start) as f64);
                        let w = dot(&qi, &kj).max(0.0);
                        for (c, vj) in out.iter_mut().zip(head(&v[j], h)) {
                            *c += w * vj;
                        }
                    }
                    out
                })
                .collect()
        })
        .collect();
    output(p, prefix, &o)
}

/// NormAttention (T1): φ = elu on q and k (after the bias), then LRPE at absolute
/// positions; `O_n = Σ_{m≤n} (q_n·k_m) v_m` (the quadratic form, no scaling, no
/// denominator).
fn norm_attention(p: &Params, prefix: &str, x: &Rows) -> Rows {
    let e = DIM / HEADS;
    let (q, k, v) = qkv(p, prefix, x);
    let (theta, u) = lrpe_params(p, prefix);
    let feat = |r: &[f64], t: usize| lrpe(&r.iter().map(|&a| elu(a)).collect::<Vec<_>>(), theta, &u, t as f64);
    let o: Vec<Rows> = (0..HEADS)
        .map(|h| {
            (0..x.len())
                .map(|n| {
                    let qn = feat(head(&q[n], h), n);
                    let mut out = vec![0.0; e];
                    for m in 0..=n {
                        let w = dot(&qn, &feat(head(&k[m], h), m));
                        for (c, vm) in out.iter_mut().zip(head(&v[m], h)) {
                            *c += w * vm;
                        }
                    }
                    out
                })
                .collect()
        })
        .collect();
    output(p, prefix, &o)
}

/// GLU with the identity activation (the authors' code): `((x W1 + b1) ⊙ (x W2 + b2)) W3 + b3`.
fn glu(p: &Params, prefix: &str, x: &Rows) -> Rows {
    let get = |n: &str, s: &[usize]| p.get(&format!("{prefix}.{n}"), s).to_vec();
    let a = linear(x, &get("w1", &[DIM, GLU]), &get("b1", &[GLU]), DIM, GLU);
    let g = linear(x, &get("w2", &[DIM, GLU]), &get("b2", &[GLU]), DIM, GLU);
    let ag: Rows = a.iter().zip(&g).map(|(ra, rg)| ra.iter().zip(rg).map(|(u, v)| u * v).collect()).collect();
    linear(&ag, &get("w3", &[GLU, DIM]), &get("b3", &[DIM]), GLU, DIM)
}

/// fairseq's sinusoidal position of token `n`: position `n + 2` (fairseq counts from its
/// padding index + 1), sin on the first half of the channels, cos on the second,
/// frequencies `exp(−i ln(10000) / (half − 1))`.
fn position(n: usize) -> Vec<f64> {
    let n = n + 2;
    let half = DIM / 2;
    let freq = |i: usize| (-(i as f64) * 10000f64.ln() / (half as f64 - 1.0)).exp();
    (0..DIM).map(|c| if c < half { (n as f64 * freq(c)).sin() } else { (n as f64 * freq(c - half)).cos() }).collect()
}

struct Reference {
    /// Mean next-token cross-entropy (NaN for one-token sequences).
    loss: f64,
    /// `[B, N − 1, vocab]`: the tied output projection of positions `0 … N − 2`.
    logits: Tensor,
    /// `[B, N, dim]`: the final SRMSNorm's output.
    hidden: Tensor,
}

fn reference(p: &Params, toks: &[Vec<usize>]) -> Reference {
    let table = p.get("embedding", &[VOCAB, DIM]);
    let (b, n) = (toks.len(), toks[0].len());
    let (mut hidden, mut logits) = (Vec::new(), Vec::new());
    let (mut total, mut count) = (0.0, 0usize);
    for seq in toks {
        // Embedding scaled by √dim, plus absolute positions.
        let mut x: Rows = seq
            .iter()
            .enumerate()
            .map(|(t, &tok)| {
                let pos = position(t);
                (0..DIM).map(|c| table[tok * DIM + c] * (DIM as f64).sqrt() + pos[c]).collect()
            })
            .collect();
        // Pre-norm blocks: layers 0 … L/2 − 1 DiagAttention, the rest NormAttention.
        for l in 0..LAYERS {
            let h: Rows = x.iter().map(|r| srms(r)).collect();
            let prefix = format!("layers.{l}.attn");
            let a = if l < LAYERS / 2 { diag_attention(p, &prefix, &h) } else { norm_attention(p, &prefix, &h) };
            for (r, d) in x.iter_mut().zip(&a) {
                r.iter_mut().zip(d).for_each(|(u, v)| *u += v);
            }
            let h: Rows = x.iter().map(|r| srms(r)).collect();
            let f = glu(p, &format!("layers.{l}.glu"), &h);
            for (r, d) in x.iter_mut().zip(&f) {
                r.iter_mut().zip(d).for_each(|(u, v)| *u += v);
            }
        }
        let y: Rows = x.iter().map(|r| srms(r)).collect();
        // Tied logits for positions 0 … N − 2, each predicting the next token.
        for t in 0..n.saturating_sub(1) {
            let z: Vec<f64> = (0..VOCAB).map(|v| dot(&y[t], &table[v * DIM..(v + 1) * DIM])).collect();
            let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = z.iter().map(|zi| (zi - top).exp()).sum::<f64>().ln() + top;
            total += lse - z[seq[t + 1]];
            count += 1;
            logits.extend(z);
        }
        hidden.extend(y.into_iter().flatten());
    }
    Reference {
        loss: total / count as f64,
        logits: Tensor::new(vec![b, n.saturating_sub(1), VOCAB], logits).unwrap(),
        hidden: Tensor::new(vec![b, n, DIM], hidden).unwrap(),
    }
}

// ------------------------------------------------------------------------ the comparison

/// The tied output projection: the einsum that reads the embedding table, and the
/// hidden states it projects (the operand of the `x[:, :-1]` slice feeding it).
fn logits_and_hidden(g: &Graph) -> (NodeId, NodeId) {
    let table = g.params.iter().find(|p| p.name == "embedding").expect("an embedding").node;
    let einsums: Vec<NodeId> = g
        .topo_order()
        .into_iter()
        .filter(|&id| matches!(g.node(id).op, Op::Einsum(_)) && g.operands(id).contains(&table))
        .collect();
    assert_eq!(einsums.len(), 1, "one einsum reads the embedding table");
    let logits = einsums[0];
    let sliced = g.operands(logits).into_iter().find(|&o| o != table).unwrap();
    assert!(matches!(g.node(sliced).op, Op::Slice { .. }), "the projection reads x[:, :-1]");
    (logits, g.operands(sliced)[0])
}

fn check(g: &Graph, params: &[Tensor], b: usize, n: usize) -> (f64, f64, f64) {
    let toks = tokens(b, n);
    let input = Tensor::new(vec![b, n], toks.iter().flatten().map(|&t| t as f64).collect()).unwrap();
    let inputs = HashMap::from([("tokens".to_string(), input)]);
    let ev = evaluate(g, &inputs, params, &EvalOptions::default()).unwrap_or_else(|e| panic!("N = {n}: {e}"));

    let named = Params(g.params.iter().zip(params).map(|(i, t)| (i.name.clone(), t.clone())).collect());
    let want = reference(&named, &toks);

    let (logits, hidden) = logits_and_hidden(g);
    let ch = compare(ev.get(hidden).unwrap(), &want.hidden);
    assert!(ch.within(TOL) && ch.max_abs < TOL, "N = {n}: final hidden states: {ch}");
    let (mut loss_err, mut logits_err) = (0.0, 0.0);
    if n > 1 {
        let cl = compare(ev.get(logits).unwrap(), &want.logits);
        assert!(cl.within(TOL) && cl.max_abs < TOL, "N = {n}: logits: {cl}");
        let got = ev.output(g, "loss").unwrap().item().unwrap();
        loss_err = (got - want.loss).abs();
        assert!(loss_err <= TOL * want.loss.abs().max(1.0), "N = {n}: loss {got} vs reference {}", want.loss);
        logits_err = cl.max_abs;
    }
    (ch.max_abs, logits_err, loss_err)
}

#[test]
fn t1_forward_matches_the_block_formulas() {
    let g = t1_graph();
    let params = perturbed_params(&g);
    // Every parameter and buffer is used by the reference under its expected name.
    let names: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
    for l in 0..LAYERS {
        for w in ["wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "lrpe.theta", "lrpe.householder"] {
            assert!(names.contains(&format!("layers.{l}.attn.{w}").as_str()), "{names:?}");
        }
        for w in ["w1", "w2", "w3", "b1", "b2", "b3"] {
            assert!(names.contains(&format!("layers.{l}.glu.{w}").as_str()), "{names:?}");
        }
    }
    assert_eq!(names.len(), 1 + LAYERS * 16, "{names:?}");
    // N = 10: three blocks of 4, the last one partial; N = 4: one full block; N = 13:
    // four blocks and one token; N = 1: the loss averages over no tokens, so only the
    // hidden states are compared.
    for (b, n) in [(2, 10), (2, 4), (1, 13), (2, 1)] {
        let (hidden, logits, loss) = check(&g, &params, b, n);
        eprintln!("B = {b}, N = {n}: max |Δ| hidden {hidden:.2e}, logits {logits:.2e}, loss {loss:.2e}");
    }
}
