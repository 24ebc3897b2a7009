//! Compile time of each model at full size, source to bundle for the host CPU (target:
//! under 2 s for `transnormer_t1`).

#[path = "common.rs"]
mod common;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for model in ["models/transnormer_t1.tn", "models/transnormer_t2.tn", "models/transformer.tn", "models/tnl.tn"] {
        group.bench_function(model, |b| {
            b.iter(|| {
                let dir = common::compile(model, &[], "compile");
                let _ = std::fs::remove_dir_all(dir);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
