//! The decode step (`passes/decode_step.rs`): one token and the states in, the next
//! token's logits and the new states out. Checked against the generation program it is
//! derived from (`next_token`, itself checked against the loss in `tests/next_token.rs`):
//! fed the tokens one at a time from zero states, the step's logits at position `p` are
//! the forward's logits after the first `p + 1` tokens, for every model in `models/` over
//! three of DiagAttention's blocks (tiny block 4, 11 positions: not a multiple of it).
//! The prefill (`passes/prefill.rs`: the chunked forward over a prompt, returning the
//! states after it) is checked the same way: its logits are the forward's, and stepping
//! on from its states gives the forward's logits at every later position.

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::backend::{backend_for, CodeGen, Target};
use tnc_compiler::driver;
use tnc_compiler::interp::{evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::{Graph, Op};
use tnc_compiler::passes::decode_step::{KV_CACHE, NEXT, POSITION, STATE};
use tnc_compiler::passes::Policy;
use tnc_compiler::pipeline::{Pipeline, Program};

const CONTEXT: i64 = 16;

fn pipeline() -> Pipeline {
    let backend = backend_for(&Target::parse("x86-64-v3").unwrap(), CodeGen::default()).unwrap();
    Pipeline::new(&*backend, false, Policy::F32)
}

fn outputs(g: &Graph, inputs: &HashMap<String, Tensor>, params: &[Tensor]) -> HashMap<String, Tensor> {
    let e = evaluate(g, inputs, params, &EvalOptions::default()).unwrap_or_else(|e| panic!("{}: {e:?}", g.name));
    e.outputs(g).into_iter().collect()
}

/// Columns `0 … n` of `[b, m]` tokens, or column `n` alone.
fn columns(t: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let (b, m) = (t.shape[0], t.shape[1]);
    let data = (0..b).flat_map(|i| t.data[i * m + range.start..i * m + range.end].to_vec()).collect();
    Tensor::new(vec![b, range.len()], data).expect("shape")
}

/// Zeros for every state input of `step` at batch `b`.
fn zero_states(step: &Graph, b: i64) -> HashMap<String, Tensor> {
    step.inputs
        .iter()
        .filter(|i| i.name.starts_with(STATE) || i.name.starts_with(KV_CACHE))
        .map(|i| {
            let shape: Vec<usize> =
                i.ty.shape.iter().map(|d| d.eval(&|s| (s == "B").then_some(b)).expect("B only") as usize).collect();
            let len = shape.iter().product();
            (i.name.clone(), Tensor::new(shape, vec![0.0; len]).expect("shape"))
        })
        .collect()
}

fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.data.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.data.iter().zip(&b.data).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Feeds `tokens[p]` for `p` in `from … n` through `step` starting from `states`, and
/// checks each position's logits against `forward` on the prefix (f64: relative 1e-10,
/// the recurrence sums in another order than the chunked form); the worst difference.
fn step_from(
    (forward, step): (&Graph, &Graph),
    params: &[Tensor],
    tokens: &Tensor,
    from: usize,
    mut states: HashMap<String, Tensor>,
    what: &str,
) -> f64 {
    let mut worst = 0f64;
    for p in from..tokens.shape[1] {
        let mut inputs = std::mem::take(&mut states);
        inputs.insert("tokens".into(), columns(tokens, p..p + 1));
        inputs.insert(POSITION.into(), Tensor::new(vec![1], vec![p as f64]).unwrap());
        let out = outputs(step, &inputs, params);
        let want = &outputs(forward, &HashMap::from([("tokens".into(), columns(tokens, 0..p + 1))]), params)["logits"];
        let got = &out["logits"];
        assert_eq!(got.shape, want.shape, "{what}");
        let err = max_relative(got, want);
        assert!(err <= 1e-10, "{what} at position {p}: logits differ by {err:e} (relative)");
        worst = worst.max(err);
        states = next_states(out);
    }
    worst
}

/// The `next_…` outputs of a step or prefill, by the name of the state they feed.
fn next_states<T>(out: impl IntoIterator<Item = (String, T)>) -> HashMap<String, T> {
    out.into_iter().filter_map(|(name, s)| Some((name.strip_prefix(NEXT)?.to_string(), s))).collect()
}

#[test]
fn stepping_one_token_at_a_time_gives_the_forward_logits_for_every_model() {
    let mut checked = Vec::new();
    for path in model_files() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let forward = pipeline().program(Program::NextToken).run_until(g.clone(), "dce").expect("next_token").graph;
        let step = match pipeline().program(Program::DecodeStep { context: CONTEXT }).run_until(g.clone(), "dce") {
            Ok(l) => l.graph,
            Err(d) => panic!("{}: {}", path.display(), d.render(&sources)),
        };
        let params = perturbed_params(&g, 3);
        let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
        let tokens = token_tensor(2, 11, vocab as usize, 29);
        let states = zero_states(&step, 2);
        assert!(!states.is_empty(), "{}: a step without state", path.display());
        let count = states.len();
        let worst = step_from((&forward, &step), &params, &tokens, 0, states, &path.display().to_string());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        eprintln!("{name}: {count} states, worst relative difference {worst:.1e}");
        checked.push(name);
    }
    assert!(checked.len() >= 4, "checked {checked:?}");
}

/// Prompts of 1, 5 (a block of 4 and one position) and 8 (two whole blocks) tokens
/// through the prefill, then the step on to position 10: every logit as the forward's.
#[test]
fn a_prefill_then_steps_give_the_forward_logits_for_every_model() {
    let mut checked = 0;
    for path in model_files() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let run = |program| match pipeline().program(program).run_until(g.clone(), "dce") {
            Ok(l) => l.graph,
            Err(d) => panic!("{}: {}", path.display(), d.render(&sources)),
        };
        let forward = run(Program::NextToken);
        let step = run(Program::DecodeStep { context: CONTEXT });
        let prefill = run(Program::Prefill { context: CONTEXT });
        let params = perturbed_params(&g, 5);
        let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
        let tokens = token_tensor(2, 11, vocab as usize, 37);
        for len in [1, 5, 8] {
            let what = format!("{} after a prompt of {len}", path.display());
            let out = outputs(&prefill, &HashMap::from([("tokens".into(), columns(&tokens, 0..len))]), &params);
            let want = &outputs(&forward, &HashMap::from([("tokens".into(), columns(&tokens, 0..len))]), &params);
            // The same program as the forward's up to the logits.
            assert_eq!(out["logits"].data, want["logits"].data, "{what}");
            let states = next_states(out);
            assert_eq!(states.len(), zero_states(&step, 2).len(), "{what}: states");
            step_from((&forward, &step), &params, &tokens, len, states, &what);
        }
        checked += 1;
    }
    assert!(checked >= 4);
}

/// Every model's step and prefill bundles compiled for the host (`check_compiled_step`).
#[test]
fn a_compiled_step_bundle_matches_the_forward_for_every_model() {
    for path in model_files() {
        check_compiled_step(&path, CONTEXT);
    }
}

/// A KV cache of 300 rows, wider than a block kernel stages (once a stack overflow when
/// the step evaluated the whole window), scored one query row at a time
/// (`passes/query_row.rs`); the prefill's cache padded to 300 rows.
#[test]
fn a_long_kv_cache_is_scored_one_query_row_at_a_time() {
    check_compiled_step(&repo().join("models/transformer.tn"), 300);
}

/// A bundle of `program` compiled for the host with the parameters `params` set.
fn compiled(g: &Graph, program: Program, params: &[Tensor]) -> tnc_runtime::Executor {
    // A directory per bundle: the loader keeps a library it opened by its path.
    let what = program.describe().replace(' ', "-");
    let dir = &std::env::temp_dir().join(format!("tnc-{what}-{}-{}", g.name, std::process::id()));
    let _ = std::fs::remove_dir_all(dir);
    let opts = driver::Options { program, ..Default::default() };
    driver::compile(g.clone(), "native", dir, opts, Vec::new()).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    let bundle = tnc_runtime::Bundle::load_cpu(dir).unwrap();
    let mut exec = tnc_runtime::Executor::cpu(&bundle, 2).unwrap();
    for (p, t) in g.params.iter().zip(params) {
        exec.set_param(&p.name, &t.data.iter().map(|&x| x as f32).collect::<Vec<_>>()).unwrap();
    }
    if bundle.manifest.scalars.iter().any(|s| s == "train") {
        exec.set_scalar("train", 0).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
    exec
}

fn runtime_tokens(t: &Tensor) -> tnc_runtime::Tensor {
    tnc_runtime::Tensor::i32(t.shape.clone(), t.data.iter().map(|&x| x as i32).collect())
}

/// The step bundle run by the runtime token by token with its states fed back, from zero
/// states and from a prefill bundle's states after 6 tokens, against the forward in the
/// interpreter (f32: relative L2 1e-5).
fn check_compiled_step(path: &std::path::Path, context: i64) {
    let (sources, g) = elaborate_path(path, &tiny_sets(path));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let params = rounded_to_f32(perturbed_params(&g, 3));
    let mut step = compiled(&g, Program::DecodeStep { context }, &params);
    let mut prefill = compiled(&g, Program::Prefill { context }, &params);
    let forward = pipeline().program(Program::NextToken).run_until(g.clone(), "dce").expect("next_token").graph;
    let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
    let (b, n) = (2usize, 11usize);
    let tokens = token_tensor(b, n, vocab as usize, 31);
    let relative_l2 = |got: &tnc_runtime::Tensor, p: usize| {
        let want =
            &outputs(&forward, &HashMap::from([("tokens".into(), columns(&tokens, 0..p + 1))]), &params)["logits"];
        let got = got.as_f32().unwrap();
        let err = got.iter().zip(&want.data).map(|(&a, b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
        err / want.data.iter().map(|b| b * b).sum::<f64>().sqrt()
    };
    let zeros: Vec<(String, tnc_runtime::Tensor)> = zero_states(&step_graph(&g, context), b as i64)
        .iter()
        .map(|(k, t)| {
            (k.clone(), tnc_runtime::Tensor::f32(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect()))
        })
        .collect();
    // A KV cache has `context` rows: a step past them would write no row and return wrong
    // logits, so it is refused as a token outside the vocabulary is. Without a KV cache
    // (states and windows only) any position runs.
    let kv_cache = zeros.iter().any(|(k, _)| k.starts_with(KV_CACHE));
    let first = runtime_tokens(&columns(&tokens, 0..1));
    for p in [context, -1, 1_000_000] {
        let position = tnc_runtime::Tensor::i32(vec![1], vec![p as i32]);
        let mut inputs: Vec<(&str, &tnc_runtime::Tensor)> = vec![("tokens", &first), (POSITION, &position)];
        inputs.extend(zeros.iter().map(|(k, v)| (k.as_str(), v)));
        match step.forward(&inputs) {
            Err(e) if kv_cache => {
                assert!(e.to_string().contains(&format!("outside 0..{context}")), "{name} at {p}: {e}")
            }
            Ok(()) if !kv_cache => {}
            other => panic!("{name} at {p}: {other:?} (a KV cache: {kv_cache})"),
        }
    }
    let prompt = 6;
    prefill.forward(&[("tokens", &runtime_tokens(&columns(&tokens, 0..prompt)))]).unwrap();
    let err = relative_l2(&prefill.output("logits").unwrap(), prompt - 1);
    assert!(err <= 1e-5, "{name}: the prefill's logits after {prompt} tokens: relative L2 {err:e}");
    let prefilled: Vec<(String, tnc_runtime::Tensor)> =
        zeros.iter().map(|(k, _)| (k.clone(), prefill.output(&format!("{NEXT}{k}")).unwrap())).collect();
    // From zero states fed back through the host; from the prefill's states kept on the
    // device (`Executor::carry`), as `tnc generate` runs.
    let names: Vec<(String, String)> = zeros.iter().map(|(k, _)| (format!("{NEXT}{k}"), k.clone())).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    for (from, mut states) in [(0, zeros), (prompt, prefilled)] {
        let on_device = from > 0;
        for p in from..n {
            let t = runtime_tokens(&columns(&tokens, p..p + 1));
            let position = tnc_runtime::Tensor::i32(vec![1], vec![p as i32]);
            let mut inputs: Vec<(&str, &tnc_runtime::Tensor)> = vec![("tokens", &t), (POSITION, &position)];
            if !on_device || p == from {
                inputs.extend(states.iter().map(|(k, v)| (k.as_str(), v)));
            }
            step.forward(&inputs).unwrap_or_else(|e| panic!("{name} at {p}: {e}"));
            let err = relative_l2(&step.output("logits").unwrap(), p);
            assert!(err <= 1e-5, "{name} at position {p} (stepping from {from}): relative L2 {err:e}");
            if on_device {
                step.carry(&pairs).unwrap();
            } else {
                for (k, v) in &mut states {
                    *v = step.output(&format!("{NEXT}{k}")).unwrap();
                }
            }
        }
    }
    // States kept on the device belong to the sizes they were kept at: a run at another
    // batch size must give them.
    let one = tnc_runtime::Tensor::i32(vec![1, 1], vec![0]);
    let position = tnc_runtime::Tensor::i32(vec![1], vec![0]);
    let err = step.forward(&[("tokens", &one), (POSITION, &position)]).unwrap_err().to_string();
    assert!(err.contains("the sizes changed since it was kept on the device"), "{name}: {err}");
    // A carry between values of different sizes is refused (logits [2, 1, 32] into a state).
    let err = step.carry(&[("logits", &names[0].1)]).unwrap_err().to_string();
    assert!(err.contains("cannot take output `logits`"), "{name}: {err}");
}

fn step_graph(g: &Graph, context: i64) -> Graph {
    pipeline().program(Program::DecodeStep { context }).run_until(g.clone(), "dce").expect("decode_step").graph
}

fn refusal(text: &str) -> tnc_grammar::Diagnostic {
    let (sources, g) = elaborate_text("variant.tn", text, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    pipeline().program(Program::DecodeStep { context: CONTEXT }).run_until(g, "dce").err().expect("refused")
}

#[test]
fn ops_that_read_other_positions_have_no_decode_step_and_say_which() {
    // A token shift (position n reads n − 1) and a mean over the sequence.
    for (body, op, why) in [
        ("x = concat([e[:, :1], e[:, :-1]], 1)", "slice", "shifts the sequence"),
        ("x = e - mean(e, 1)", "reduce_sum", "reduces over the sequence"),
        // Learned positions read from a fixed-size table: row p at the step, not row 0.
        (
            "param table: [32, dim] ~ normal(0.5)\n  x = e + unsqueeze(table[:N], 0)",
            "slice",
            "cuts or pads a tensor of fixed size to the sequence's length",
        ),
    ] {
        let text = format!(
            "use std\nmodel variant(vocab = 8, dim = 4) {{\n  input tokens: i32[B, N]\n  param embedding: [vocab, dim] ~ \
             normal(0.5)\n  e = embed(tokens, embedding)\n  {body}\n  output loss = lm_loss(x, embedding, tokens)\n}}\n"
        );
        let d = refusal(&text);
        assert!(d.message.contains(&format!("`{op}` {why}")), "{body}: {}", d.message);
        assert!(d.span.is_some(), "{body}: no span");
        assert!(d.hint.as_deref().is_some_and(|h| h.contains("causal linear attention")), "{body}");
    }
}

#[test]
fn a_non_causal_linear_attention_has_no_decode_step() {
    let d = refusal(
        "use std\nmodel variant(vocab = 8, dim = 4) {\n  input tokens: i32[B, N]\n  param embedding: [vocab, dim] ~ \
         normal(0.5)\n  x = embed(tokens, embedding)\n  x = x + norm_attention(x, 2, causal = false, use_lrpe = false)\n  \
         output loss = lm_loss(x, embedding, tokens)\n}\n",
    );
    assert!(d.message.contains("`linear_attention` is not causal"), "{}", d.message);
}

/// Attention in blocks spelled so that its positions count from the sequence's start (or
/// left unrecognized): the step cannot count them from the block's start, so it is refused
/// rather than wrong.
#[test]
fn blocks_with_positions_from_the_sequence_start_have_no_decode_step() {
    let d = refusal(
        "use std\n\
         fn absolute_diag(x: [B, N, D], heads, block = 4) {\n\
           E = D / heads\n\
           param wq, wk, wv: [D, D] ~ xavier\n\
           nb = ceil_div(N, block)\n\
           padded = nb * block\n\
           blocks = |t| reshape(pad(split_heads(t, heads), 2, 0, padded - N), [B, heads, nb, block, E])\n\
           rotate = lrpe(E)\n\
           pos = reshape(float(iota(padded)), [nb, block])\n\
           q = rotate(blocks(x @ wq), pos)\n\
           k = rotate(blocks(x @ wk), pos)\n\
           weights = where(causal_mask(block), relu(einsum(\"bhcie,bhcje->bhcij\", q, k)), 0.0)\n\
           o = einsum(\"bhcij,bhcje->bhcie\", weights, blocks(x @ wv))\n\
           merge_heads(reshape(o, [B, heads, padded, E])[:, :, :N])\n\
         }\n\
         model variant(vocab = 8, dim = 4) {\n\
           input tokens: i32[B, N]\n\
           param embedding: [vocab, dim] ~ normal(0.5)\n\
           x = embed(tokens, embedding)\n\
           x = x + absolute_diag(x, 2)\n\
           output loss = lm_loss(x, embedding, tokens)\n\
         }\n",
    );
    assert!(
        d.message.contains("counted from the start of the sequence")
            || d.message.contains("groups the sequence into blocks"),
        "{}",
        d.message
    );
}

/// The softmax step over a KV cache scores one query row where its weights region has a
/// row form (the transformer's), and the whole window where it has not (here a reshape
/// merges the query and key axes): the same logits as the forward either way.
#[test]
fn a_weights_region_without_a_row_form_scores_the_whole_window() {
    let flat = "use std\n\
        fn flat_attention(x: [B, N, D], heads) {\n\
          E = D / heads\n\
          param wq, wk, wv: [D, D] ~ xavier\n\
          s = einsum(\"bhne,bhme->bhnm\", split_heads(x @ wq, heads), split_heads(x @ wk, heads)) * E ** -0.5\n\
          w = where(causal_mask(N), s, -1e9)\n\
          flat = reshape(reshape(w, [B, heads, N * N]) - 1.0, [B, heads, N, N])\n\
          merge_heads(einsum(\"bhnm,bhme->bhne\", softmax(flat), split_heads(x @ wv, heads)))\n\
        }\n\
        model variant(vocab = 8, dim = 4) {\n\
          input tokens: i32[B, N]\n\
          param embedding: [vocab, dim] ~ normal(0.5)\n\
          x = embed(tokens, embedding)\n\
          x = x + flat_attention(x, 2)\n\
          output loss = lm_loss(x, embedding, tokens)\n\
        }\n";
    let (sources, flat) = elaborate_text("flat.tn", flat, &[]);
    let flat = flat.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let path = repo().join("models/transformer.tn");
    let (sources, transformer) = elaborate_path(&path, &tiny_sets(&path));
    let transformer = transformer.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    for (g, whole_window) in [(flat, true), (transformer, false)] {
        let forward = pipeline().program(Program::NextToken).run_until(g.clone(), "dce").expect("next_token").graph;
        let step = step_graph(&g, CONTEXT);
        let windows = step.topo_order().into_iter().filter(|&n| matches!(step.node(n).op, Op::BlockAttention(_)));
        assert_eq!(windows.count() > 0, whole_window, "{}", g.name);
        let params = perturbed_params(&g, 7);
        let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
        let tokens = token_tensor(2, 11, vocab as usize, 41);
        step_from((&forward, &step), &params, &tokens, 0, zero_states(&step, 2), &g.name);
    }
}
