//! One training step of `transnormer_t1` at the configuration our performance goals are
//! stated for (`--set vocab=4096 dim=256 heads=4 layers=4 glu_dim=683`), B 2, N 1024 and
//! 4096: forward, and forward + backward, on the host CPU through the runtime.

#[path = "common.rs"]
mod common;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let dir = common::compile(
        "models/transnormer_t1.tn",
        &["vocab=4096", "dim=256", "heads=4", "layers=4", "glu_dim=683", "drop=0.0"],
        "t1",
    );
    let mut exec = common::executor(&dir);
    let mut group = c.benchmark_group("transnormer_t1");
    group.sample_size(10);
    for n in [1024usize, 4096] {
        let tokens = common::tokens(2, n, 4096);
        group.bench_function(format!("forward B2 N{n}"), |b| b.iter(|| exec.forward(&[("tokens", &tokens)]).unwrap()));
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

criterion_group!(benches, bench);
criterion_main!(benches);
