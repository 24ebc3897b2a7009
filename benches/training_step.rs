//! One training step of `transnormer_t1` at the configuration our performance goals are
//! stated for (`--set vocab=4096 dim=256 heads=4 layers=4 glu_dim=683`), B 2, N 1024 and
//! 4096: forward, and forward + backward, on the host CPU through the runtime, with f32
//! and with bf16 products (`--precision bf16`: AMX where the CPU has it).

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

criterion_group!(benches, bench);
criterion_main!(benches);
