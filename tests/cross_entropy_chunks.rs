//! CPU schedules run the fused cross-entropy as vocabulary chunks of library GEMMs
//! (`compiler/src/schedule/cross_entropy_chunks.rs`), GPU schedules as the same chunks
//! with the GEMMs tiled block kernels (run by the GPU-semantics executor). With a vocabulary of 2,100 words
//! (chunks of 1,024, 1,024 and 52), tied and untied, the reference kernel executor
//! (f32, buffers NaN-filled) matches the interpreter (f64): loss, every gradient and the
//! per-token accuracy, within 1e-4 relative L2 (accuracy exactly, including tokens whose
//! target is the largest logit: a target logit recomputed in another summation order than
//! the maximum once made those count as wrong).

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Tensor};
use tnc_compiler::ir::Graph;
use tnc_compiler::passes::{self, Pass};
use tnc_compiler::pipeline;
use tnc_compiler::schedule;

const VOCAB: usize = 2100;

fn model(loss: &str) -> Graph {
    model_of(VOCAB, loss)
}

fn model_of(vocab: usize, loss: &str) -> Graph {
    let text = format!(
        "use std\nmodel m(vocab = {vocab}, dim = 32) {{\n  input tokens: i32[B, N]\n  \
         param embedding: [vocab, dim] ~ normal(0.5)\n  param w_out: [dim, vocab] ~ normal(0.5)\n  \
         x = srms_norm(embed(tokens, embedding))\n  h = x[:, :-1]\n  y = tokens[:, 1:]\n  \
         output loss = {loss}\n}}\n"
    );
    let (sources, g) = elaborate_text("ce.tn", &text, &[]);
    g.unwrap_or_else(|d| panic!("{}\n{text}", d.render(&sources)))
}

/// Checks `g` on random tokens, and on sequences that repeat one token (so with the tied
/// table the target is often the largest logit, and the accuracy has hits to get right);
/// returns the number of correct tokens. CPU and GPU schedules.
fn check(tag: &str, g: Graph) -> usize {
    let gpu = check_with(&format!("{tag} (GPU)"), g.clone(), &schedule::ScheduleOptions::gpu());
    let cpu = check_with(tag, g, &schedule::ScheduleOptions::cpu());
    assert_eq!(gpu, cpu, "{tag}: the same tokens are correct on both");
    cpu
}

fn check_with(tag: &str, g: Graph, opts: &schedule::ScheduleOptions) -> usize {
    let reference = passes::differentiate_loss(g.clone()).unwrap();
    let mut optimized = g;
    for p in passes::pipeline() {
        optimized = p.run(optimized).unwrap_or_else(|d| panic!("{tag}: {}", d.message));
    }
    optimized = passes::Accuracy.run(optimized).unwrap_or_else(|d| panic!("{tag}: {}", d.message));
    let s = pipeline::scheduled_with(&optimized, opts).unwrap();
    // Library nodes on CPUs; on GPUs the tiled GEMMs, the only blocks of 256 threads.
    let product = |k: &tnc_compiler::kernel::Kernel| k.gemm.is_some() || k.threads == Some(256);
    let products = s.steps.iter().filter(|st| product(&s.kernels[st.kernel])).count();
    // Three chunks for each of the logsumexp, dX (two products a chunk), dE (two) and
    // the accuracy: at least 3·(1 + 2 + 2 + 1) GEMM launches.
    assert!(products >= 18, "{tag}: {products} GEMM launches");
    assert_eq!(s.kernels.iter().any(|k| k.gemm.is_some()), opts.library_gemm, "{tag}: library nodes on CPUs only");
    let params = perturbed_params(&reference, 3);
    let (b, n) = (2, 7);
    let random = token_tensor(b, n, VOCAB, 5);
    let mut repeated = random.clone();
    for (i, v) in repeated.data.iter_mut().enumerate() {
        *v = random.data[i / n * n];
    }
    let mut hits = 0;
    for tokens in [random, repeated] {
        hits += check_tokens(tag, &reference, &optimized, &s, &params, tokens);
    }
    hits
}

fn check_tokens(
    tag: &str,
    reference: &Graph,
    optimized: &Graph,
    s: &schedule::Schedule,
    params: &[Tensor],
    tokens: Tensor,
) -> usize {
    let (b, n) = (tokens.shape[0], tokens.shape[1]);
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let want = evaluate(reference, &inputs, params, &EvalOptions::default()).unwrap().outputs(reference);
    let accuracy = evaluate(optimized, &inputs, params, &EvalOptions::default()).unwrap().outputs(optimized);
    let sizes = HashMap::from([("B".to_string(), b as i64), ("N".to_string(), n as i64)]);
    let got = schedule::run::run(s, &sizes, &[tokens], params, None).unwrap_or_else(|e| panic!("{tag}: {e}"));
    for (name, w) in want {
        let mut t: Tensor = got[&name].clone();
        t.shape = w.shape.clone();
        let c = compare(&t, &w);
        assert!(
            c.within(1e-4),
            "{tag} `{name}`: {c:?} got {:?} want {:?}",
            &t.data[..t.data.len().min(4)],
            &w.data[..w.data.len().min(4)]
        );
    }
    let correct = &accuracy.iter().find(|(name, _)| name == "correct").expect("an accuracy output").1;
    assert_eq!(got["correct"].data, correct.data, "{tag}: per-token accuracy");
    correct.data.iter().filter(|&&c| c == 1.0).count()
}

#[test]
fn tied_table_in_three_chunks_matches_the_interpreter() {
    let hits = check("tied", model("lm_loss(x, embedding, tokens)"));
    assert!(hits > 0, "no token's target was a largest logit: the accuracy was not exercised");
}

#[test]
fn untied_projection_in_three_chunks_matches_the_interpreter() {
    check("untied", model("cross_entropy(h @ w_out, y)"));
}

/// With a vocabulary small enough that the logits are kept (`Shared::keeps`), a training
/// program computes them once: the forward's one product serves the loss and the
/// accuracy (which once ran a second product on a copy of the hidden states), and the
/// backward's two products (dX, dE) read them too. Loss, gradients and accuracy still
/// match the interpreter, tied and untied.
#[test]
fn kept_logits_are_computed_once_for_the_loss_and_the_accuracy() {
    for (tag, loss) in [("tied", "lm_loss(x, embedding, tokens)"), ("untied", "cross_entropy(h @ w_out, y)")] {
        let g = model_of(32, loss);
        let reference = passes::differentiate_loss(g.clone()).unwrap();
        let mut optimized = g;
        for p in passes::pipeline() {
            optimized = p.run(optimized).unwrap_or_else(|d| panic!("{tag}: {}", d.message));
        }
        optimized = passes::Accuracy.run(optimized).unwrap();
        let s = pipeline::scheduled_with(&optimized, &schedule::ScheduleOptions::cpu()).unwrap();
        let products = |entry: schedule::Entry| {
            s.steps
                .iter()
                .filter(|st| st.entry == entry)
                .map(|st| &s.kernels[st.kernel])
                .filter(|k| k.gemm.is_some() && k.name.contains("cross_entropy"))
                .count()
        };
        assert_eq!(products(schedule::Entry::Forward), 1, "{tag}: logits products in the forward");
        assert_eq!(products(schedule::Entry::Backward), 2, "{tag}: products in the backward (dX, dE)");
        let params = perturbed_params(&reference, 3);
        // The first sequence repeats one token (with the tied table its targets are
        // largest logits: hits for the accuracy), the second is random (so the mean loss
        // is not the near-zero loss of the first, which f32 resolves only to an ulp of z).
        let random = token_tensor(2, 7, 32, 5);
        let mut half_repeated = random.clone();
        half_repeated.data[..7].fill(random.data[0]);
        let hits: usize = [random, half_repeated]
            .into_iter()
            .map(|t| check_tokens(tag, &reference, &optimized, &s, &params, t))
            .sum();
        assert!(hits < 24, "{tag}: every token correct");
        assert!(tag != "tied" || hits >= 6, "{tag}: {hits} tokens correct: the accuracy was not exercised");
    }
}

/// The chunks' launches are written to the manifest as runs (`bundle/src/launch_runs.rs`):
/// a training bundle's manifest is as large at 2^20 words (1,024 chunks) as at 2^13, and
/// loads back as every chunk's launches (listed one by one, each of the 6,150 backward
/// launches at 2^20 cost ~45 bytes). Only the sizes' digits differ (82 bytes measured).
#[test]
fn the_manifest_does_not_grow_with_the_vocabulary() {
    let manifest_of = |vocab: usize| {
        let dir = std::env::temp_dir().join(format!("tnc-ce-manifest-{vocab}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = tnc_compiler::driver::Options { train: true, ..Default::default() };
        tnc_compiler::driver::compile(
            model_of(vocab, "lm_loss(x, embedding, tokens)"),
            "native",
            &dir,
            opts,
            Vec::new(),
        )
        .unwrap();
        let bytes = std::fs::metadata(dir.join("manifest.json")).unwrap().len();
        let bundle = tnc_runtime::Bundle::load(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (bytes, bundle.manifest.entry_points["backward"].len())
    };
    let (small, small_launches) = manifest_of(1 << 13);
    let (large, large_launches) = manifest_of(1 << 20);
    eprintln!(
        "manifest {small} bytes at 2^13 words ({small_launches} backward launches), {large} at 2^20 ({large_launches})"
    );
    assert!(large < small + 256, "{large} bytes at 2^20 words, {small} at 2^13");
    // dX and dE: at least two launches per chunk each.
    assert!(large_launches >= 4 * 1024, "{large_launches} backward launches at 2^20 words");
}
