//! The structure of every optimized forward+backward graph, through the fusion inspector:
//! each causal NormAttention is one linear-attention op forward and at most three
//! backward, each DiagAttention one block-attention op each way, the loss one fused
//! cross-entropy, and no tensor of the kinds that make memory blow up: no value has both
//! a position axis and a d×e state (`[.., N, d, e]`), no N×N value exists (except in the
//! softmax baseline before recognition), and no [B, N, V] logits.

mod common;
use common::*;
use tnc_compiler::fusion::fuse;
use tnc_compiler::ir::{Dim, Graph};
use tnc_compiler::passes;

fn optimized(path: &std::path::Path) -> Graph {
    let (sources, g) = elaborate_path(path, &tiny_sets(path));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let last = *passes::names().last().unwrap();
    passes::run_until(g, last).unwrap().unwrap()
}

fn depends_on_n(d: &Dim) -> bool {
    d.symbols().iter().any(|s| s == "N")
}

#[test]
fn optimized_graphs_have_the_fused_structure() {
    for path in model_files() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let g = optimized(&path);
        let plan = fuse(&g).unwrap();
        let (norm, diag) = match name.as_str() {
            "transformer" => (0, 2),
            "tnl" | "t1_all_norm" | "gla_simple" | "retnet" => (2, 0),
            _ => (1, 1),
        };
        let la = plan.count_ops("linear_attention");
        assert!(la >= norm && la <= 4 * norm, "{name}: {la} linear-attention ops for {norm} NormAttention layers");
        assert_eq!(plan.count_ops("block_attention"), diag, "{name}");
        assert_eq!(plan.count_ops("block_attention_grad"), diag, "{name}");
        assert_eq!(plan.count_ops("cross_entropy"), 1, "{name}");
        let vocab = g.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].clone();
        for n in g.dag.node_indices() {
            let ty = g.ty(n);
            let s = &ty.shape;
            let n_axes = s.iter().filter(|d| depends_on_n(d)).count();
            assert!(n_axes <= 1, "{name}: {} {ty} has two position axes (N×N)", g.node(n).op.kind());
            if n_axes == 1 {
                assert!(!s.contains(&vocab), "{name}: {} {ty} is logits-sized [.., N, V]", g.node(n).op.kind());
                // A per-head state d×e next to a position axis: two trailing head-width axes.
                let head = Dim::constant(8);
                let state = s.len() >= 2 && s[s.len() - 1] == head && s[s.len() - 2] == head;
                assert!(!state, "{name}: {} {ty} holds a d×e state per position", g.node(n).op.kind());
            }
        }
        // Every node belongs to exactly one kernel group (or is a parameter/input).
        for n in g.dag.node_indices() {
            let op = &g.node(n).op;
            if matches!(op, tnc_compiler::ir::Op::Param { .. } | tnc_compiler::ir::Op::Input { .. }) {
                continue;
            }
            let owners = plan.groups.iter().filter(|gr| gr.contains(n)).count();
            assert_eq!(owners, 1, "{name}: {} owned by {owners} groups", op.kind());
        }
    }
}

/// The precision pass: with bf16 products, both operands of every contraction and the
/// cross-entropy's hidden states and table are bf16, a cast of an f32 value made once
/// (a parameter's bf16 copy is shared by the forward product and the backward ones), and
/// nothing else is 16-bit: products, norms, attention ops, the loss and every gradient
/// stay f32. With f32 (the default) nothing is 16-bit.
#[test]
fn sixteen_bit_products_narrow_their_operands_and_nothing_else() {
    use tnc_compiler::ir::{DType, Op};
    for path in model_files() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let last = *passes::names().last().unwrap();
        let plain = passes::run_until(g.clone(), last).unwrap().unwrap();
        assert!(plain.dag.node_indices().all(|n| plain.ty(n).dtype != DType::BF16), "{name}");
        let g = passes::run_until_with(g, last, passes::Policy::Bf16).unwrap().unwrap();
        let mut cast_sources = std::collections::HashSet::new();
        let (mut products, mut casts) = (0, 0);
        for n in g.dag.node_indices() {
            let op = &g.node(n).op;
            let ops = g.operands(n);
            if g.ty(n).dtype == DType::BF16 {
                assert!(matches!(op, Op::Cast { .. }), "{name}: a `{}` is bf16", op.kind());
                assert_eq!(g.ty(ops[0]).dtype, DType::F32, "{name}: a cast of a non-f32 value");
                assert!(cast_sources.insert(ops[0]), "{name}: a value is narrowed twice");
                casts += 1;
            }
            let narrowed = match op {
                Op::Einsum(spec)
                    if spec.inputs.len() == 2 && spec.inputs.iter().flatten().any(|l| !spec.output.contains(l)) =>
                {
                    true
                }
                Op::CrossEntropy(_)
                | Op::CrossEntropyGradX(_)
                | Op::CrossEntropyGradTable(_)
                | Op::CrossEntropyCorrect(_) => true,
                _ => false,
            };
            if narrowed {
                products += 1;
                assert!(
                    ops[..2].iter().all(|&o| g.ty(o).dtype == DType::BF16),
                    "{name}: a `{}` reads f32 operands",
                    op.kind()
                );
                assert_eq!(g.ty(n).dtype, DType::F32, "{name}: a `{}` is not f32", op.kind());
            }
        }
        // Forward and backward projections, the loss's three ops.
        assert!(products >= 6 && casts >= 4, "{name}: {products} products, {casts} casts");
    }
}

/// `precision f32 { … }` pins the products written inside it — here a GLU's output
/// projection, called through a function, and the tied-embedding loss — to f32 under
/// `--precision bf16`: they and their gradients' products read f32 operands, while the
/// product outside the block (the input projection, forward and both gradients) reads
/// bf16 ones. `tnc ir` marks a pinned product `f32`.
#[test]
fn products_inside_precision_f32_keep_f32_operands() {
    use tnc_compiler::ir::{DType, Op};
    let text = "use std\n\
                fn out_proj(h, w) = h @ w\n\
                model m(vocab = 16, dim = 8) {\n  \
                  input tokens: i32[B, N]\n  \
                  param embedding: [vocab, dim] ~ normal(0.5)\n  \
                  param w_in: [dim, dim] ~ xavier()\n  \
                  param w_out: [dim, dim] ~ xavier()\n  \
                  x = embed(tokens, embedding)\n  \
                  h = x @ w_in\n  \
                  precision f32 {\n    \
                    y = out_proj(relu(h), w_out)\n    \
                    loss = lm_loss(srms_norm(y), embedding, tokens)\n  \
                  }\n  \
                  output loss = loss\n\
                }\n";
    let (sources, g) = elaborate_text("pinned.tn", text, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let last = *passes::names().last().unwrap();
    let g = passes::run_until_with(g, last, passes::Policy::Bf16).unwrap().unwrap();
    let (mut pinned, mut narrowed) = (0, 0);
    for n in g.dag.node_indices() {
        let ops = g.operands(n);
        let (is_pinned, dtypes): (bool, Vec<DType>) = match &g.node(n).op {
            Op::Einsum(spec)
                if spec.inputs.len() == 2 && spec.inputs.iter().flatten().any(|l| !spec.output.contains(l)) =>
            {
                (spec.pinned, ops.iter().map(|&o| g.ty(o).dtype).collect())
            }
            Op::CrossEntropy(ce) | Op::CrossEntropyGradX(ce) | Op::CrossEntropyGradTable(ce) => {
                (ce.pinned, ops[..2].iter().map(|&o| g.ty(o).dtype).collect())
            }
            _ => continue,
        };
        let want = if is_pinned { DType::F32 } else { DType::BF16 };
        assert!(
            dtypes.iter().all(|&d| d == want),
            "pinned {is_pinned}: {dtypes:?}\n{}",
            tnc_compiler::ir::print::to_text(&g)
        );
        if is_pinned {
            pinned += 1
        } else {
            narrowed += 1
        }
    }
    // Pinned: w_out's product and its two gradients, the loss and its two gradients.
    // Narrowed: x @ w_in and its two gradients (x is the embedding's, a parameter's).
    assert_eq!((pinned, narrowed), (6, 3), "{}", tnc_compiler::ir::print::to_text(&g));
    let printed = tnc_compiler::ir::print::to_text(&g);
    assert!(printed.contains(" f32]") && printed.contains("cross_entropy[f32]"), "{printed}");
}

/// Only `f32` can be pinned; anything else is an error at the name, with a hint.
#[test]
fn precision_other_than_f32_is_an_error() {
    let text = "model m() {\n  input x: [N, 4]\n  precision bf16 {\n    y = x * 2.0\n  }\n  output y = y\n}\n";
    let (sources, g) = elaborate_text("bad.tn", text, &[]);
    let d = g.err().expect("an error");
    let shown = d.render(&sources);
    assert!(shown.contains("`precision bf16` is not supported") && shown.contains("only `f32`"), "{shown}");
    assert!(shown.contains("bad.tn:3:13"), "{shown}");
}

/// Token ids index the embedding and name the loss's targets: the bounds found for the
/// input are the vocabulary, and the interpreter refuses ids outside it (and
/// non-integers) before evaluating anything, with the check every executor makes.
#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    use std::collections::HashMap;
    use tnc_compiler::interp::{evaluate, init_params, EvalOptions, Tensor};
    let path = repo().join("models/transnormer_t1.tn");
    let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let bounds = tnc_compiler::ir::index_bounds::input_bounds(&g);
    assert_eq!(bounds, vec![vec![tnc_compiler::ir::Dim::constant(32)]], "tokens index a vocabulary of 32");
    let params = init_params(&g, 1).unwrap();
    let run = |ids: Vec<f64>| {
        let inputs = HashMap::from([("tokens".to_string(), Tensor { shape: vec![1, 4], data: ids })]);
        evaluate(&g, &inputs, &params, &EvalOptions::default()).map(|_| ())
    };
    run(vec![0.0, 5.0, 31.0, 2.0]).unwrap();
    let e = run(vec![0.0, 5.0, 32.0, 2.0]).unwrap_err();
    assert!(e.contains("input `tokens` holds 32 at flat index 2, outside 0..32"), "{e}");
    let e = run(vec![-1.0, 5.0, 3.0, 2.0]).unwrap_err();
    assert!(e.contains("holds -1 at flat index 0"), "{e}");
    let e = run(vec![0.0, 1.5, 3.0, 2.0]).unwrap_err();
    assert!(e.contains("is i32 but holds 1.5"), "{e}");
}
