//! Shared set-up for the benchmarks: compile a model with `--set` values into a bundle
//! for the host and load it into the CPU runtime.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use tnc_compiler::frontend::{self, Input, Request};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn compile(model: &str, sets: &[&str], tag: &str) -> PathBuf {
    compile_with(model, sets, tag, tnc_compiler::passes::Policy::F32)
}

/// [`compile`] with a precision policy.
pub fn compile_with(model: &str, sets: &[&str], tag: &str, precision: tnc_compiler::passes::Policy) -> PathBuf {
    compile_by(model, sets, tag, precision, tnc_compiler::backend::CodeGen::Llvm)
}

/// [`compile_with`] by a chosen code generator.
pub fn compile_by(
    model: &str,
    sets: &[&str],
    tag: &str,
    precision: tnc_compiler::passes::Policy,
    codegen: tnc_compiler::backend::CodeGen,
) -> PathBuf {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (sources, g) = frontend::elaborate(Input::Path(&repo().join(model)), &Request { sets: &sets, model: None });
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let dir = std::env::temp_dir().join(format!("tnc-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = tnc_compiler::driver::Options { precision, codegen, ..Default::default() };
    tnc_compiler::driver::compile(g, "native", &dir, opts, Vec::new()).expect("compiles");
    dir
}

pub fn executor(dir: &Path) -> tnc_runtime::Executor {
    let bundle = tnc_runtime::Bundle::load_cpu(dir).expect("loads");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut exec = tnc_runtime::Executor::cpu(&bundle, threads).expect("executor");
    exec.set_params_from_seed(0).expect("params");
    exec
}

pub fn tokens(b: usize, n: usize, vocab: usize) -> tnc_runtime::Tensor {
    tnc_runtime::Tensor::i32(vec![b, n], (0..b * n).map(|i| ((i * 7919) % vocab) as i32).collect())
}
