//! Property test: linear attention written in many equivalent ways — random feature maps
//! built from primitive ops, random norms, no decay, a constant decay or a trained gate,
//! LRPE on or off, causal or bidirectional, and random spellings (cumsum of outer
//! products, tril-masked quadratic form, gated quadratic form with a segment-sum mask,
//! decayed scan, renamed indices, swapped and transposed operands, permuted
//! layouts) — is always recognized as exactly one linear-attention op, and the optimized
//! graph matches the unoptimized one forward and in every gradient. Look-alikes that are
//! different functions are left alone and still match.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::HashMap;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::{Decay as ir_decay, Graph, Op};
use tnc_compiler::passes;
use tnc_compiler::pipeline;

const UNARY: &[&str] = &["elu", "relu", "silu", "sigmoid", "tanh", "exp", "sin", "abs"];

/// A random elementwise feature map of `t`, as tnc source.
fn feature_map(choice: &[usize]) -> String {
    let mut e = "t".to_string();
    for (i, &c) in choice.iter().enumerate() {
        e = match (c + i) % 6 {
            0 => format!("{}({e})", UNARY[c % UNARY.len()]),
            1 => format!("1 + {}({e})", UNARY[(c / 2) % UNARY.len()]),
            2 => format!("({e}) * 0.5"),
            3 => format!("{}({e}) ** 2", UNARY[(c / 3) % UNARY.len()]),
            4 => format!("maximum({e}, 0.1 * ({e}))"),
            _ => e,
        };
    }
    e
}

#[derive(Clone, Debug)]
struct Case {
    phi: Vec<usize>,
    norm: usize,
    /// 0: none, 1: one λ per head (a buffer), 2: a gate per head and position, trained.
    decay: usize,
    lrpe: bool,
    causal: bool,
    spelling: usize,
    letters: Vec<u8>,
    swap: bool,
    kv_order: usize,
    mask_style: usize,
    n: usize,
    chunk: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(0usize..48, 0..3),
        0usize..4,
        0usize..3,
        any::<bool>(),
        any::<bool>(),
        0usize..3,
        Just((b'a'..=b'z').collect::<Vec<u8>>()).prop_shuffle().prop_map(|mut l| {
            l.truncate(6);
            l
        }),
        any::<bool>(),
        0usize..3,
        0usize..4,
        1usize..12,
        1usize..9,
    )
        .prop_map(|(phi, norm, decay, lrpe, causal, spelling, letters, swap, kv_order, mask_style, n, chunk)| {
            Case { phi, norm, decay, lrpe, causal, spelling, letters, swap, kv_order, mask_style, n, chunk }
        })
}

/// An einsum call with operands possibly swapped.
fn einsum(a: (&str, &str), b: (&str, &str), out: &str, swap: bool) -> String {
    if swap {
        format!("einsum(\"{},{}->{out}\", {}, {})", b.0, a.0, b.1, a.1)
    } else {
        format!("einsum(\"{},{}->{out}\", {}, {})", a.0, b.0, a.1, b.1)
    }
}

/// The attention core of a case, producing `o: [B, H, N, E]` from `q, k, v: [B, H, N, E]`.
fn attention(c: &Case) -> String {
    let l = |i: usize| (c.letters[i] as char).to_string();
    let (b, h, n, m, d, e) = (l(0), l(1), l(2), l(3), l(4), l(5));
    let q = format!("{b}{h}{n}{d}");
    let k = format!("{b}{h}{n}{d}");
    let v = format!("{b}{h}{n}{e}");
    let out = format!("{b}{h}{n}{e}");
    // A constant decay is only written as a decayed scan; a gate also as the quadratic
    // form's segment-sum mask.
    let spelling = if c.decay == 1 && c.causal { 0 } else { c.spelling };
    if c.causal && spelling != 1 {
        // The cumulative sum of outer products, with the kv state in one of three layouts.
        let (kv, axis, lam_shape, gate) = match c.kv_order {
            0 => (
                format!("{b}{h}{n}{d}{e}"),
                2,
                "[1, heads, 1, 1, 1]",
                "reshape(permute(g, [0, 2, 1]), [B, heads, N, 1, 1])",
            ),
            1 => (
                format!("{h}{b}{n}{e}{d}"),
                2,
                "[heads, 1, 1, 1, 1]",
                "reshape(permute(g, [2, 0, 1]), [heads, B, N, 1, 1])",
            ),
            _ => (format!("{b}{n}{h}{d}{e}"), 1, "[1, 1, heads, 1, 1]", "reshape(g, [B, N, heads, 1, 1])"),
        };
        // A gate per head and position from the tokens, trained: `g` is [B, N, heads].
        let gate_def = if c.decay == 2 { "param wg: [dim, heads] ~ xavier\n  g = sigmoid(x @ wg)\n  " } else { "" };
        let decay = match c.decay {
            0 => String::new(),
            1 => format!(", decay = reshape(lam, {lam_shape})"),
            _ => format!(", decay = {gate}"),
        };
        let scan = if spelling == 2 && c.decay == 0 {
            // A decayed scan whose decay is the constant 1 is a plain cumulative sum.
            format!("cumsum(kv, {axis}, decay = 1.0)")
        } else {
            format!("cumsum(kv, {axis}{decay})")
        };
        format!(
            "{gate_def}kv = {}\n  state = {scan}\n  o = {}",
            einsum((&k, "k"), (&v, "v"), &kv, c.swap),
            einsum((&q, "q"), (&kv, "state"), &out, !c.swap)
        )
    } else if c.causal || spelling == 1 {
        // The quadratic form, masked (causal) or not.
        let scores = einsum((&q, "q"), (&format!("{b}{h}{m}{d}"), "k"), &format!("{b}{h}{n}{m}"), c.swap);
        let mask = match c.mask_style {
            0 => "causal_mask(N)".to_string(),
            1 => "unsqueeze(iota(N), -1) >= iota(N)".to_string(),
            2 => "iota(N) <= unsqueeze(iota(N), -1)".to_string(),
            _ => "not (unsqueeze(iota(N), -1) < iota(N))".to_string(),
        };
        // A gate: cumulative log-gates G [B, H, N] (as a cumulative sum, as something
        // else, or in another layout) and the decay matrix exp(G_n − G_m) [B, H, N, M].
        let gated = c.decay == 2 && c.causal;
        let segment_sum = match c.kv_order {
            0 => "param wg: [dim, heads] ~ xavier\n  G = cumsum(permute(log(sigmoid(x @ wg)), [0, 2, 1]), 2)\n  \
                  w = exp(unsqueeze(G, -1) - unsqueeze(G, -2))\n  ",
            1 => "param wg: [dim, heads] ~ xavier\n  G = 0.0 - cumsum(permute(0.0 - log(sigmoid(x @ wg)), [0, 2, 1]), 2)\n  \
                  w = exp(unsqueeze(G, -1) - unsqueeze(G, -2))\n  ",
            _ => "param wg: [dim, heads] ~ xavier\n  G = cumsum(log(sigmoid(x @ wg)), 1)\n  \
                  w = permute(exp(unsqueeze(G, 2) - unsqueeze(G, 1)), [0, 3, 1, 2])\n  ",
        };
        let p = match (c.causal, gated, c.mask_style % 2) {
            (false, _, _) => "scores".to_string(),
            (true, false, 0) => format!("where({mask}, scores, 0.0)"),
            (true, false, _) => format!("scores * float({mask})"),
            (true, true, 0) => format!("where({mask}, scores * w, 0.0)"),
            (true, true, _) => format!("scores * where({mask}, w, 0.0)"),
        };
        let gate_def = if gated { segment_sum } else { "" };
        format!(
            "{gate_def}scores = {scores}\n  p = {p}\n  o = {}",
            einsum((&format!("{b}{h}{n}{m}"), "p"), (&format!("{b}{h}{m}{e}"), "v"), &out, c.swap)
        )
    } else {
        // Bidirectional Q (Kᵀ V).
        format!(
            "kv = {}\n  o = {}",
            einsum((&k, "k"), (&v, "v"), &format!("{b}{h}{d}{e}"), c.swap),
            einsum((&q, "q"), (&format!("{b}{h}{d}{e}"), "kv"), &out, c.swap)
        )
    }
}

/// A hand-picked case: φ = elu, SRMSNorm, no LRPE, causal, the cumulative-sum spelling
/// with the kv state `[b, h, n, d, e]`, the given decay (as [`Case::decay`]), length and chunk.
fn pinned(decay: usize, n: usize, chunk: usize) -> Case {
    Case {
        phi: vec![0],
        norm: 0,
        decay,
        lrpe: false,
        causal: true,
        spelling: 0,
        letters: b"bhnmde".to_vec(),
        swap: false,
        kv_order: 0,
        mask_style: 0,
        n,
        chunk,
    }
}

fn source(c: &Case) -> String {
    source_with_eps(c, None)
}

/// [`source`] with the norm's `eps` set (`None`: its default).
///
/// The f32 schedules need a larger one: a scale-invariant norm of a nearly zero vector
/// (a ReLU feature map can zero a token's scores) turns f32 rounding into O(1)
/// differences — SRMSNorm's default `eps = 1e-8` failed at N = 1 with rel. L2 up to 0.9
/// on correct kernels, and still 2.6e-4 with `1e-4`; the model is ill-conditioned there,
/// in any f32 implementation.
fn source_with_eps(c: &Case, eps: Option<&str>) -> String {
    let norm = ["srms_norm", "rms_norm", "layer_norm", "identity"][c.norm];
    let eps = match eps {
        Some(e) if norm != "identity" => format!(", eps = {e}"),
        _ => String::new(),
    };
    let lrpe = if c.lrpe {
        "rotate = lrpe(E)\n  pos = float(iota(N))\n  q = rotate(q, pos)\n  k = rotate(k, pos)\n"
    } else {
        ""
    };
    format!(
        "use std
model spelled(dim = 8, heads = 2, vocab = 11) {{
  input tokens: i32[B, N]
  param embedding: [vocab, dim] ~ normal(0.5)
  buffer lam: [heads] ~ exp(-(0.05 + 0.3 * float(iota(heads))))
  x = embed(tokens, embedding)
  E = dim / heads
  param wq, wk, wv, wo: [dim, dim] ~ xavier
  phi = |t| {phi}
  q = phi(split_heads(x @ wq, heads))
  k = phi(split_heads(x @ wk, heads))
  v = split_heads(x @ wv, heads)
  {lrpe}  {attention}
  y = {norm}(merge_heads(o){eps}) @ wo
  output loss = mean(y * y) + mean(y)
}}
",
        phi = feature_map(&c.phi),
        attention = attention(c)
    )
}

fn count_la(g: &Graph) -> usize {
    g.dag.node_weights().filter(|n| matches!(n.op, Op::LinearAttention(_))).count()
}

fn outputs(g: &Graph, params: &[Tensor], tokens: &Tensor, chunk: Option<usize>) -> HashMap<String, Tensor> {
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let e = evaluate(g, &inputs, params, &EvalOptions { chunk, ..EvalOptions::default() }).expect("evaluates");
    e.outputs(g).into_iter().collect()
}

/// Elaborate `text`; check the number of linear attentions after `recognize`, and that
/// loss and gradients match the unoptimized graph.
fn check(text: &str, expected_la: usize, n: usize, chunk: usize) -> Result<(), String> {
    let (sources, g) = elaborate_text("spelled.tn", text, &[]);
    let g = g.map_err(|d| format!("{}\n{text}", d.render(&sources)))?;
    let recognized = passes::run_until(g.clone(), "recognize").unwrap().map_err(|d| d.message)?;
    let found = count_la(&recognized);
    if found != expected_la {
        return Err(format!("{found} linear attentions after recognize, expected {expected_la}\n{text}"));
    }
    // A recognized spelling leaves nothing for `tnc check` to warn about.
    let warnings = tnc_compiler::lint::unfused_state_warnings(&recognized, 1, 64);
    if expected_la > 0 && !warnings.is_empty() {
        return Err(format!("recognized, yet warned: {}\n{text}", warnings[0].render(&sources)));
    }
    check_numerics(g, text, n, chunk)
}

/// The optimized graph `g` (elaborated from `text`) against the unoptimized one: loss and
/// every gradient, naive and by chunks of `chunk`, within 1e-10 — or within ten times the
/// reference's own rounding noise where that is larger.
///
/// Why the noise: a random feature map such as `1 + exp(exp(t) ** 2)` spans many orders of
/// magnitude, and its gradients cancel in sums; there, moving every parameter by one ulp
/// already moves the unoptimized graph's `grad.wk` by 5e-11 rel. L2 (CI's case of 2026-12-07,
/// pinned below), so two exact spellings that only sum in another order differ by 1.3e-10.
/// A wrong rewrite differs by O(1). Cases whose noise passes 1e-7 say nothing about
/// exactness and are rejected.
fn check_numerics(g: Graph, text: &str, n: usize, chunk: usize) -> Result<(), String> {
    let reference = passes::differentiate_loss(g.clone()).map_err(|d| d.message)?;
    let optimized = passes::run_until(g, "autodiff").unwrap().map_err(|d| d.message)?;
    let params = perturbed_params(&reference, n as u64);
    let tokens = token_tensor(2, n, 11, 3);
    let want = outputs(&reference, &params, &tokens, None);
    let noise = rounding_noise(&reference, &params, &tokens, &want);
    if let Some((name, x)) = noise.iter().find(|(_, &x)| x > 1e-7) {
        return Err(format!("{ILL_CONDITIONED}: `{name}` moves by {x:e} under a one-ulp change"));
    }
    for c in [None, Some(chunk)] {
        let got = outputs(&optimized, &params, &tokens, c);
        for (name, w) in &want {
            let cl = compare(&got[name], w);
            if !cl.within(f64::max(1e-10, 10.0 * noise[name])) {
                return Err(format!(
                    "`{name}` differs (chunk {c:?}; rounding noise {:e}): {cl:?}\n{text}",
                    noise[name]
                ));
            }
        }
    }
    Ok(())
}

/// Marks a case [`check_numerics`] cannot judge; the property tests reject it.
const ILL_CONDITIONED: &str = "too ill-conditioned to test exactness";

/// Per output, how far the unoptimized graph's value moves (rel. L2) when every parameter
/// moves by one ulp, alternately up and down: the rounding noise of the reference itself.
fn rounding_noise(
    reference: &Graph,
    params: &[Tensor],
    tokens: &Tensor,
    want: &HashMap<String, Tensor>,
) -> HashMap<String, f64> {
    let mut nudged = params.to_vec();
    for (j, t) in nudged.iter_mut().enumerate() {
        for (i, v) in t.data.iter_mut().enumerate() {
            *v *= 1.0 + if (i + j) % 2 == 0 { f64::EPSILON } else { -f64::EPSILON };
        }
    }
    let moved = outputs(reference, &nudged, tokens, None);
    want.iter().map(|(name, w)| (name.clone(), compare(&moved[name], w).rel_l2)).collect()
}

/// A property-test verdict from [`check`]: an ill-conditioned case is rejected, not failed.
fn verdict(result: Result<(), String>) -> Result<(), TestCaseError> {
    match result {
        Err(e) if e.starts_with(ILL_CONDITIONED) => Err(TestCaseError::reject(e)),
        r => r.map_err(TestCaseError::fail),
    }
}

#[test]
fn every_spelling_is_recognized_and_exact() {
    let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
    runner
        .run(&case(), |c| {
            // `eps = 1e-4`: a norm of a nearly zero row with the default 1e-8 amplifies
            // rounding past 1e-10 (see the pinned case below); recognition is what is tested.
            verdict(check(&source_with_eps(&c, Some("1e-4")), 1, c.n, c.chunk))?;
            Ok(())
        })
        .unwrap();
}

/// Look-alikes: each is a different function, must stay unrecognized, and still match.
/// The base case of the look-alike fixtures, and the fixtures: edits of its cumsum and
/// quadratic spellings that change what they compute (made on the source with the norm's
/// `eps` given, when `eps` is).
fn look_alikes(eps: Option<&str>) -> (Case, Vec<(&'static str, String)>) {
    let base = Case { mask_style: 1, ..pinned(0, 9, 4) };
    let cumsum = source_with_eps(&base, eps);
    let quadratic = source_with_eps(&Case { spelling: 1, mask_style: 2, ..base.clone() }, eps);
    let fixtures = vec![
        ("exclusive cumsum", cumsum.replace("state = cumsum(kv, 2)", "state = cumsum(kv, 2) - kv")),
        ("cumsum over a feature axis", cumsum.replace("state = cumsum(kv, 2)", "state = cumsum(kv, 3)")),
        (
            "sum of cumsums over two axes",
            cumsum.replace("state = cumsum(kv, 2)", "state = cumsum(kv, 2) * 0.5 + cumsum(kv, 1)"),
        ),
        ("nonlinearity between scores and v", quadratic.replace("scores, 0.0)", "exp(scores), 0.0)")),
        ("mask without its diagonal", quadratic.replace("iota(N) <= unsqueeze", "iota(N) < unsqueeze")),
        (
            "banded mask",
            quadratic.replace(
                "where(iota(N) <= unsqueeze(iota(N), -1),",
                "where((iota(N) <= unsqueeze(iota(N), -1)) and (unsqueeze(iota(N), -1) < iota(N) + 3),",
            ),
        ),
        (
            "decay that varies along features",
            cumsum.replace(
                "state = cumsum(kv, 2)",
                "state = cumsum(kv, 2, decay = reshape(1.0 / (2.0 + float(iota(4))), [1, 1, 1, 4, 1]))",
            ),
        ),
    ];
    let mut fixtures = fixtures;
    let gated = source_with_eps(&Case { decay: 2, spelling: 1, mask_style: 0, ..base.clone() }, eps);
    let segment_sum = "w = exp(unsqueeze(G, -1) - unsqueeze(G, -2))";
    assert!(gated.contains(segment_sum), "{gated}");
    fixtures.push((
        "decay matrix growing with the distance",
        gated.replace(segment_sum, "w = exp(unsqueeze(G, -2) - unsqueeze(G, -1))"),
    ));
    fixtures.push(("decay matrix of one position's gates", gated.replace(segment_sum, "w = exp(unsqueeze(G, -1))")));
    for (what, text) in &fixtures {
        assert_ne!(*text, cumsum, "{what}: the fixture edit did not apply");
        assert_ne!(*text, quadratic, "{what}: the fixture edit did not apply");
    }
    (base, fixtures)
}

/// Each look-alike that keeps a per-position state or an N×N value is warned about
/// (`tnc_compiler::lint`), with the reason recognition did not apply.
#[test]
fn look_alikes_are_warned_about_with_the_reason() {
    let expected = [
        ("exclusive cumsum", vec!["keeps a 4×4 state for every position", "not read by an einsum", "sub"]),
        ("cumsum over a feature axis", vec!["keeps a 4×4 state", "runs over axis 3, of size 4"]),
        ("sum of cumsums over two axes", vec!["not read by an einsum", "runs over axis 1"]),
        ("decay that varies along features", vec!["keeps a 4×4 state", "changes along the state's feature axes"]),
        ("decay matrix growing with the distance", vec!["values of N×N positions"]),
        ("decay matrix of one position's gates", vec!["values of N×N positions"]),
    ];
    for (what, text) in look_alikes(None).1 {
        let (sources, g) = elaborate_text("spelled.tn", &text, &[]);
        let g = g.unwrap_or_else(|d| panic!("{what}: {}", d.render(&sources)));
        let recognized = passes::run_until(g, "recognize").unwrap().unwrap();
        let rendered: String =
            tnc_compiler::lint::unfused_state_warnings(&recognized, 1, 64).iter().map(|d| d.render(&sources)).collect();
        match expected.iter().find(|(w, _)| *w == what) {
            Some((_, parts)) => {
                assert!(rendered.starts_with("warning: "), "{what}: {rendered}");
                for p in parts {
                    assert!(rendered.contains(p), "{what}: no `{p}` in\n{rendered}");
                }
            }
            // The quadratic look-alikes run as block attention (scores per block).
            None => {
                assert!(rendered.is_empty(), "{what}: {rendered}");
                let blocks = recognized
                    .topo_order()
                    .into_iter()
                    .filter(|&n| matches!(recognized.node(n).op, Op::BlockAttention(_)));
                assert_eq!(blocks.count(), 1, "{what}");
            }
        }
    }
}

#[test]
fn look_alikes_are_left_alone() {
    for (what, text) in look_alikes(None).1 {
        check(&text, 0, 9, 4).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// The look-alike fixtures fused and scheduled for GPUs (run by the GPU-semantics
/// executor) and CPUs, against the interpreter.
#[test]
fn look_alikes_scheduled_match_the_interpreter() {
    let (base, fixtures) = look_alikes(Some("1e-2"));
    for (what, text) in fixtures {
        check_scheduled_source(&text, base.n).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// 100 random spellings, fused and scheduled, run by the reference kernel executor (f32
/// kernels, buffers NaN-filled) against the interpreter (f64): loss and every gradient
/// within 1e-4 relative L2 — each schedule (generated, and CPU with library GEMMs) at two
/// lengths.
#[test]
fn scheduled_spellings_match_the_interpreter() {
    let mut runner = TestRunner::new(Config { cases: 100, failure_persistence: None, ..Config::default() });
    runner.run(&case(), |c| check_scheduled(&c).map_err(TestCaseError::fail)).unwrap();
}

/// A case the property test found: a ReLU² feature map at N = 1 zeroes some tokens'
/// scores, and SRMSNorm's default `eps` made the f32 result ill-conditioned (see
/// [`source_with_eps`]).
#[test]
fn a_relu_feature_map_at_one_token_stays_well_conditioned() {
    let c = Case {
        phi: vec![3],
        norm: 0,
        decay: 0,
        lrpe: true,
        causal: true,
        spelling: 0,
        letters: vec![b'a', b'b', b'c', b'd', b'e', b'f'],
        swap: false,
        kv_order: 0,
        mask_style: 0,
        n: 1,
        chunk: 1,
    };
    check_scheduled(&c).unwrap();
}

fn check_scheduled(c: &Case) -> Result<(), String> {
    check_scheduled_source(&source_with_eps(c, Some("1e-2")), c.n)
}

/// The model `text` scheduled for GPUs and CPUs, at N = `n` and `n + 5`, against the
/// interpreter.
fn check_scheduled_source(text: &str, n: usize) -> Result<(), String> {
    use tnc_compiler::schedule;
    let (sources, g) = elaborate_text("spelled.tn", text, &[]);
    let g = g.map_err(|d| d.render(&sources))?;
    let reference = passes::differentiate_loss(g.clone()).unwrap();
    let last = *passes::names().last().unwrap();
    let optimized = passes::run_until(g, last).unwrap().unwrap();
    let params = perturbed_params(&reference, 1);
    // The GPU schedule (block kernels, run by the GPU-semantics executor) and the CPU one
    // with library GEMMs.
    for opts in [schedule::ScheduleOptions::gpu(), schedule::ScheduleOptions::cpu()] {
        let s = pipeline::scheduled_with(&optimized, &opts).map_err(|e| format!("{e}\n{text}"))?;
        for len in [n, n + 5] {
            let tokens = token_tensor(2, len, 11, 3);
            let want = outputs(&reference, &params, &tokens, None);
            let sizes = HashMap::from([("B".to_string(), 2), ("N".to_string(), len as i64)]);
            let got = schedule::run::run(&s, &sizes, &[tokens], &params, None).map_err(|e| format!("{e}\n{text}"))?;
            for (name, w) in &want {
                let mut t = got[name].clone();
                t.shape = w.shape.clone();
                let cl = compare(&t, w);
                let tiny = cl.max_abs < 1e-6; // within f32 resolution of every element
                if !(cl.within(1e-4) || (tiny && !cl.has_nan)) {
                    return Err(format!("{opts:?} N={len} `{name}`: {cl:?}\n{text}"));
                }
            }
        }
    }
    Ok(())
}

/// A decay that is trained is refused with a diagnostic at the decayed cumulative sum
/// (its gradient, Σ_t t·(q_t·dq_t − k_t·dk_t), is not generated yet).
#[test]
fn a_trainable_decay_is_a_diagnostic() {
    let base = pinned(1, 5, 2);
    let text = source(&base).replace("buffer lam: [heads]", "param lam: [heads]");
    assert!(text.contains("param lam"), "{text}");
    let (sources, g) = elaborate_text("trained_decay.tn", &text, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let err = passes::run_until(g, "recognize").unwrap().unwrap_err();
    let rendered = err.render(&sources);
    assert!(rendered.contains("a trainable per-head decay λ is not supported"), "{rendered}");
    assert!(rendered.contains("trained_decay.tn:"), "the diagnostic points at the source: {rendered}");
}

/// A case the exactness property test found: a ReLU² feature map with LRPE at N = 4.
/// With SRMSNorm's default `eps = 1e-8` the norm of a nearly zero row amplifies f64
/// rounding (3.5e-10 relative in `grad.wo` between the recognized and the original
/// graph); with `eps = 1e-4` both agree to rounding, so recognition is exact here.
#[test]
fn a_relu_feature_map_with_lrpe_is_exact_when_the_norm_is_well_conditioned() {
    let c = pinned_ci_shape();
    check(&source_with_eps(&c, Some("1e-4")), 1, c.n, c.chunk).unwrap();
}

/// The case CI's exactness property test failed on 2026-12-07 under a flat 1e-10: φ =
/// `1 + exp(exp(t) ** 2)` with LRPE, the decayed-scan spelling, N = 9. The recognized
/// graph's `grad.wk` differs from the original's by 1.27e-10 rel. L2, while a one-ulp change
/// of the parameters moves the original's own `grad.wk` by 5.3e-11: rounding noise, which
/// [`check_numerics`] now allows ten times of.
#[test]
fn a_doubly_exponential_feature_map_agrees_to_its_rounding_noise() {
    let c = Case { phi: vec![39, 42], n: 9, ..pinned_ci_shape() };
    let text = source_with_eps(&c, Some("1e-4"));
    assert!(text.contains("phi = |t| 1 + exp(exp(t) ** 2)"), "{text}");
    check(&text, 1, c.n, c.chunk).unwrap();
}

/// The shape of the property-test cases found by CI: SRMSNorm, no decay, LRPE, causal,
/// the decayed-scan spelling (`cumsum(kv, 2, decay = 1.0)`) with letters `abcdef`, chunk 1.
fn pinned_ci_shape() -> Case {
    Case {
        phi: vec![27],
        norm: 0,
        decay: 0,
        lrpe: true,
        causal: true,
        spelling: 2,
        letters: b"abcdef".to_vec(),
        swap: false,
        kv_order: 0,
        mask_style: 0,
        n: 4,
        chunk: 1,
    }
}

/// 100 random spellings compiled to bundles by the Cranelift back end (the whole pipeline,
/// recognizer included) and run by the CPU runtime against the f64 interpreter: loss and
/// every gradient within 1e-4 relative L2, at the case's length and 5 more.
#[test]
fn cranelift_compiled_spellings_match_the_interpreter() {
    let mut runner = TestRunner::new(Config { cases: 100, failure_persistence: None, ..Config::default() });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&case(), |c| {
            let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            check_compiled(&source_with_eps(&c, Some("1e-2")), c.n, i).map_err(TestCaseError::fail)
        })
        .unwrap();
}

fn check_compiled(text: &str, n: usize, case: usize) -> Result<(), String> {
    use tnc_compiler::driver;
    let (sources, g) = elaborate_text("spelled.tn", text, &[]);
    let g = g.map_err(|d| d.render(&sources))?;
    let reference = passes::differentiate_loss(g.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("tnc-spellings-cranelift-{}-{case}", std::process::id()));
    let opts = driver::Options { codegen: tnc_compiler::backend::CodeGen::Cranelift, ..Default::default() };
    driver::compile(g, "native", &dir, opts, Vec::new()).map_err(|e| format!("{e}\n{text}"))?;
    let params = rounded_to_f32(perturbed_params(&reference, 1));
    let pfile = dir.join("params.safetensors");
    let named: Vec<(String, &Tensor)> = reference.params.iter().map(|p| p.name.clone()).zip(params.iter()).collect();
    tnc_compiler::interp::write_safetensors(&pfile, &named, tnc_compiler::interp::FileDType::F32)?;
    let bundle = tnc_runtime::Bundle::load_cpu(&dir).map_err(|e| e.to_string())?;
    let mut exec = tnc_runtime::Executor::cpu(&bundle, 2).map_err(|e| e.to_string())?;
    exec.set_params_from_file(&pfile).map_err(|e| e.to_string())?;
    for len in [n, n + 5] {
        let tokens = token_tensor(2, len, 11, 3);
        let want = outputs(&reference, &params, &tokens, None);
        let t = tnc_runtime::Tensor::i32(tokens.shape.clone(), tokens.data.iter().map(|&x| x as i32).collect());
        exec.forward(&[("tokens", &t)]).map_err(|e| e.to_string())?;
        exec.backward(&[]).map_err(|e| e.to_string())?;
        for (name, w) in &want {
            let got = exec.output(name).map_err(|e| format!("`{name}`: {e}"))?;
            let data = got.as_f32().ok_or("an f32 output")?.iter().map(|&x| x as f64).collect();
            let cl = compare(&Tensor { shape: w.shape.clone(), data }, w);
            let tiny = cl.max_abs < 1e-6; // within f32 resolution of every element
            if !(cl.within(1e-4) || (tiny && !cl.has_nan)) {
                return Err(format!("Cranelift N={len} `{name}`: {cl:?}\n{text}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The gated quadratic form, `where(tril, scores · exp(G_n − G_m), 0) · v` with G the
/// cumulative log-gates, and its anticausal mirror `where(triu, scores · exp(G_m − G_n),
/// 0)`: one gated linear attention each, matching forward and in every gradient.
#[test]
fn segment_sum_masks_are_recognized_in_both_directions() {
    let c = Case { spelling: 1, ..pinned(2, 10, 3) };
    let causal = source_with_eps(&c, Some("1e-4"));
    let (mask, w) = ("where(causal_mask(N), scores * w", "w = exp(unsqueeze(G, -1) - unsqueeze(G, -2))");
    assert!(causal.contains(mask) && causal.contains(w), "{causal}");
    let anticausal = causal
        .replace(mask, "where(unsqueeze(iota(N), -1) <= iota(N), scores * w")
        .replace(w, "w = exp(unsqueeze(G, -2) - unsqueeze(G, -1))");
    for text in [causal, anticausal] {
        check(&text, 1, c.n, c.chunk).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

/// A gate per head and position, trained, in both directions: the forward scan and the
/// reverse one (whose gates the recognizer shifts by a position), recognized as one gated
/// linear attention whose loss and every gradient (the gate's projection `wg` included)
/// match the unrecognized scan, naive and chunked (chunks of 3 over 10 positions).
#[test]
fn gated_scans_are_recognized_in_both_directions() {
    let c = pinned(2, 10, 3);
    let forward = source_with_eps(&c, Some("1e-4"));
    assert!(forward.contains("cumsum(kv, 2, decay = reshape(permute(g"), "{forward}");
    let reverse = forward.replace("cumsum(kv, 2, decay", "cumsum(kv, 2, reverse = true, decay");
    for text in [forward, reverse] {
        check(&text, 1, c.n, c.chunk).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

/// Gates that are not the decay of the state: one applied to the product after it
/// (`o = (q S) · g`), and one that depends on an undecayed state of the same keys and
/// values (`g = sigmoid(Σ cumsum(kv))`, the nearest a dataflow graph comes to a gate of
/// the state). The first is an ungated linear attention times g; the second a gated one
/// whose gate's own cumulative sum stays a scan (it is read by a sum, not by queries).
/// Both compute what they say, forward and in every gradient.
#[test]
fn gates_outside_the_decay_are_not_taken_for_it() {
    let c = pinned(2, 9, 4);
    let gated = source_with_eps(&c, Some("1e-4"));
    let decayed = "state = cumsum(kv, 2, decay = reshape(permute(g, [0, 2, 1]), [B, heads, N, 1, 1]))";
    let product = "o = einsum(\"bhnde,bhnd->bhne\", state, q)";
    assert!(gated.contains(decayed) && gated.contains(product), "{gated}");
    let after = gated
        .replace(decayed, "state = cumsum(kv, 2)")
        .replace(product, &format!("{product} * unsqueeze(permute(g, [0, 2, 1]), -1)"));
    let of_state =
        gated.replace(decayed, "state = cumsum(kv, 2, decay = sigmoid(sum(sum(cumsum(kv, 2), 3), 4) * 0.1))");
    for (text, want) in [(&after, ir_decay::None), (&of_state, ir_decay::PerToken)] {
        let (sources, g) = elaborate_text("spelled.tn", text, &[]);
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let recognized = passes::run_until(g.clone(), "recognize").unwrap().unwrap();
        let decays: Vec<ir_decay> = recognized
            .dag
            .node_weights()
            .filter_map(|n| match &n.op {
                Op::LinearAttention(la) => Some(la.decay),
                _ => None,
            })
            .collect();
        assert_eq!(decays, [want], "{text}");
        let lint = tnc_compiler::lint::unfused_state_warnings(&recognized, 1, 64);
        assert_eq!(lint.is_empty(), want == ir_decay::None, "{text}: the gate's own scan is warned about");
        check_numerics(g, text, c.n, c.chunk).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}
