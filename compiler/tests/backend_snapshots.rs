//! One corpus of kernels through every back end, pinned by snapshots (naga's `tests/in`
//! → `tests/out/<backend>` layout): the hand-built kernels of `common/kernels.rs` (every
//! operator, casts, arrays, branches, 16-bit stores, dropout, a block kernel for GPUs) as
//! each writer emits them, so that a change to a writer shows as a reviewed diff.
//!
//! - `out/kernel-ir/`: the corpus itself, in the kernel IR's text form;
//! - `out/llvm/`: the LLVM native writer's IR for x86-64-v3, before O3;
//! - `out/cranelift/`: the Cranelift writer's IR (CLIF) for x86-64-v3, before Cranelift
//!   optimizes it;
//! - `out/nvptx/`: the PTX for sm80 (after O3, as `kernels.ptx` holds it).
//!
//! What the code computes is tested elsewhere (`cpu_backends.rs`, `ptx.rs`); these pin
//! what the writers write.

mod common;
use common::kernels::*;
use tnc_compiler::backend::{self, CodeGen, CpuTarget, GpuTarget, Target};
use tnc_compiler::kernel::{print, Kernel};

fn corpus() -> Vec<Kernel> {
    vec![
        broadcast_kernel(),
        math_kernel(),
        reduce_kernel(),
        kahan_kernel(),
        sixteen_bit_kernel(),
        branch_kernel(),
        cast_kernel(),
        array_kernel(),
        dropout_kernel(),
    ]
}

fn snapshot(backend: &str, name: &str, text: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(format!("out/{backend}"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(name.to_string(), text));
}

#[test]
fn the_corpus_through_every_back_end() {
    let cpu = CpuTarget::parse("x86-64-v3").unwrap();
    let gpu = GpuTarget::parse("sm80").unwrap();
    let cranelift = backend::backend_for(&Target::Cpu(cpu.clone()), CodeGen::Cranelift).unwrap();
    let mut kernels = corpus();
    kernels.push(block_row_sum(BlockBug::None));
    for k in &kernels {
        let one = std::slice::from_ref(k);
        snapshot("kernel-ir", &k.name, &print::to_text(k));
        if k.threads.is_none() {
            snapshot("llvm", &k.name, &backend::emit_llvm_ir(one, &cpu, false).unwrap());
            let emit = backend::Emit { llvm: true, asm: false };
            let written = cranelift.write(one, emit).unwrap();
            let (_, clif) = written.extras.iter().find(|(suffix, _)| *suffix == "clif").expect("--emit llvm's CLIF");
            snapshot("cranelift", &k.name, std::str::from_utf8(clif).unwrap());
        }
        snapshot("nvptx", &k.name, &backend::emit_ptx(one, &gpu).unwrap());
    }
}
