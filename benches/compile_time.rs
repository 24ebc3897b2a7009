//! Compile time of each model at full size, source to bundle for the host CPU (target:
//! under 2 s for `transnormer_t1`), with LLVM (`compile/MODEL`) and Cranelift
//! (`compile/cranelift/MODEL`) writing the kernels.

#[path = "common.rs"]
mod common;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for model in ["models/transnormer_t1.tn", "models/transnormer_t2.tn", "models/transformer.tn", "models/tnl.tn"] {
        for codegen in tnc_compiler::backend::CodeGen::ALL {
            let name = match codegen {
                tnc_compiler::backend::CodeGen::Llvm => model.to_string(),
                other => format!("{}/{model}", other.name()),
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    let dir = common::compile_by(model, &[], "compile", tnc_compiler::passes::Policy::F32, codegen);
                    let _ = std::fs::remove_dir_all(dir);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
