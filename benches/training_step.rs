//! One training step of `transnormer_t1` at the configuration our performance goals are
//! stated for (`--set vocab=4096 dim=256 heads=4 layers=4 glu_dim=683`), B 2, N 1024 and
//! 4096: forward, and forward + backward, on the host CPU through the runtime, with f32
//! and with bf16 products (`--precision bf16`: AMX where the CPU has it).
//!
//! So that nothing is tuned to that one configuration, the group `other models` times the
//! f32 training step (B 2, N 1024) of T2 and TNL at the same sizes and of a 12-layer T1 at
//! dim 512 (8 heads, GLU 1365): other attention kernels (φ = 1 + elu, decayed and gated
//! linear attention), other GEMM shapes, a deeper stack.

#[path = "common.rs"]
mod common;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    use tnc_compiler::passes::Policy;
    for precision in [Policy::F32, Policy::Bf16] {
        let dir = common::compile_with(
            "models/transnormer_t1.tn",
            &["vocab=4096", "dim=256", "heads=4", "layers=4", "glu_dim=683", "drop=0.0"],
            &format!("t1-{}", precision.name()),
            precision,
        );
        let mut exec = common::executor(&dir);
        let mut group = c.benchmark_group(format!("transnormer_t1 {}", precision.name()));
        group.sample_size(10);
        for n in [1024usize, 4096] {
            let tokens = common::tokens(2, n, 4096);
            group.bench_function(format!("forward B2 N{n}"), |b| {
                b.iter(|| exec.forward(&[("tokens", &tokens)]).unwrap())
            });
            group.bench_function(format!("forward+backward B2 N{n}"), |b| {
                b.iter(|| {
                    exec.forward(&[("tokens", &tokens)]).unwrap();
                    exec.backward(&[]).unwrap();
                })
            });
        }
        group.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `(bench name, model file, --set values)` of the other models.
const OTHER_MODELS: [(&str, &str, &[&str]); 3] = [
    (
        "transnormer_t2",
        "models/transnormer_t2.tn",
        &["vocab=4096", "dim=256", "heads=4", "layers=4", "glu_dim=683", "drop=0.0"],
    ),
    ("tnl", "models/tnl.tn", &["vocab=4096", "dim=256", "heads=4", "layers=4", "glu_dim=683", "drop=0.0"]),
    (
        "transnormer_t1 12 layers dim 512",
        "models/transnormer_t1.tn",
        &["vocab=4096", "dim=512", "heads=8", "layers=12", "glu_dim=1365", "drop=0.0"],
    ),
];

fn other_models(c: &mut Criterion) {
    let mut group = c.benchmark_group("other models f32");
    group.sample_size(10);
    for (name, model, sets) in OTHER_MODELS {
        let dir = common::compile(model, sets, &name.replace(' ', "-"));
        let mut exec = common::executor(&dir);
        let tokens = common::tokens(2, 1024, 4096);
        group.bench_function(format!("{name} forward+backward B2 N1024"), |b| {
            b.iter(|| {
                exec.forward(&[("tokens", &tokens)]).unwrap();
                exec.backward(&[]).unwrap();
            })
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();
}

criterion_group!(benches, bench, other_models);
criterion_main!(benches);
