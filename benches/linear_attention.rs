//! The fused causal linear-attention kernel, forward and backward, d = e = 64, one head,
//! N from 1K to 64K: time per token must stay flat (linear in N), and the achieved
//! GFLOP/s (counting the chunked algorithm's 2·N·(C·(d+e) + 2·d·e) flops per head,
//! C = 64) is printed by the `--verbose` throughput line.

#[path = "common.rs"]
mod common;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let model = common::repo().join("benches/linear_attention.tn");
    let dir = common::compile(model.to_str().unwrap(), &[], "la");
    let mut exec = common::executor(&dir);
    let mut group = c.benchmark_group("linear_attention_d64");
    group.sample_size(10);
    for n in [1024usize, 4096, 16384, 65536] {
        let x =
            tnc_runtime::Tensor::f32(vec![1, 1, n, 64], (0..n * 64).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect());
        group.throughput(Throughput::Elements(n as u64));
        let inputs = [("x", &x)];
        group.bench_function(format!("forward N{n}"), |b| b.iter(|| exec.forward(&inputs).unwrap()));
        group.bench_function(format!("forward+backward N{n}"), |b| {
            b.iter(|| {
                exec.forward(&inputs).unwrap();
                exec.backward(&[]).unwrap();
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
