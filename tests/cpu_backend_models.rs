//! The CPU back ends (LLVM and Cranelift) on real schedules: every model (tiny
//! configuration) is fused and scheduled (generic lowering, and with `recognize` where
//! its kernels exist), all its kernels are compiled for `native` into one shared object, and
//! the program is stepped through with the reference kernel executor; at every step the
//! compiled kernel runs on a copy of the same inputs (its parallel range split in two)
//! and must write the same values (f32 within 1e-5 relative, integers and masks exactly).

mod common;
use common::*;
use std::collections::HashMap;
use std::ffi::c_void;
use tnc_compiler::backend::{self, CodeGen, CpuTarget, Target};
use tnc_compiler::ir::Graph;
use tnc_compiler::kernel::exec::{self, Buffer};
use tnc_compiler::kernel::{Access, Binary, Expr};
use tnc_compiler::passes;
use tnc_compiler::pipeline;
use tnc_compiler::schedule::run::{to_bytes, to_typed};

type KernelFn = unsafe extern "C" fn(*const *mut c_void, *const i64, i64, i64);

/// The pipeline with `precision`, optionally without `recognize` (the generic lowering of
/// every op).
fn optimize(g: Graph, recognize: bool, precision: passes::Policy) -> Graph {
    let mut g = g;
    for p in passes::pipeline_with(precision) {
        if p.name() == "recognize" && !recognize {
            continue;
        }
        g = p.run(g).unwrap_or_else(|d| panic!("{}: {}", p.name(), d.message));
    }
    g
}

fn int(e: &Expr, sizes: &[i64]) -> i64 {
    match e {
        Expr::I64(i) => *i,
        Expr::Size(i) => sizes[*i],
        Expr::Binary(op, a, b) => {
            let (a, b) = (int(a, sizes), int(b, sizes));
            match op {
                Binary::Add => a + b,
                Binary::Sub => a - b,
                Binary::Mul => a * b,
                Binary::Div => a / b,
                Binary::Rem => a % b,
                Binary::Max => a.max(b),
                Binary::Min => a.min(b),
                _ => panic!("extent operator {op:?}"),
            }
        }
        e => panic!("extent {e:?}"),
    }
}

fn check_model(
    path: &std::path::Path,
    recognize: bool,
    precision: passes::Policy,
    target: &CpuTarget,
    codegen: CodeGen,
) {
    let (sources, g) = elaborate_path(path, &tiny_sets(path));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let reference = passes::differentiate_loss(g.clone()).unwrap();
    let optimized = optimize(g, recognize, precision);
    let model = format!(
        "{} (recognize: {recognize}, {}, {})",
        path.file_name().unwrap().to_string_lossy(),
        precision.name(),
        codegen.name()
    );
    let s = match pipeline::scheduled_with(&optimized, &Default::default()) {
        Ok(s) => s,
        // Kernel templates for recognized ops arrive one by one; the generic lowering
        // covers every model.
        Err(e) if recognize && e.contains("no kernel template") => {
            eprintln!("{model}: not scheduled yet ({e})");
            return;
        }
        Err(e) => panic!("{model}: {e}"),
    };

    let dedup = backend::dedup_kernels(&s.kernels).unwrap();
    let written = backend::backend_for(&Target::Cpu(target.clone()), codegen)
        .and_then(|b| b.write(&dedup.kernels, backend::Emit::default()))
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let dir = std::env::temp_dir().join(format!(
        "tnc-cpu-backend-models-{}-{}-{recognize}-{}-{}",
        std::process::id(),
        path.file_stem().unwrap().to_string_lossy(),
        precision.name(),
        codegen.name()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("kernels.so");
    let bytes = written.file("kernels.so").expect("a CPU bundle has kernels.so");
    std::fs::write(&so, bytes).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();

    let params = perturbed_params(&reference, 5);
    let vocab =
        reference.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap() as usize;
    let (b, n) = (2usize, 7usize);
    let tokens = token_tensor(b, n, vocab, 3);
    let sizes = HashMap::from([("B".to_string(), b as i64), ("N".to_string(), n as i64)]);
    let mut args: Vec<i64> = s.sizes.iter().map(|n| sizes[n]).collect();
    args.extend([7, 3, 1]); // dropout on: seed 7, step 3
    let value_of = |name: &str| sizes.get(name).copied();
    let mut memory: Vec<Vec<u8>> =
        s.buffers.iter().map(|b| vec![0xFFu8; b.bytes.eval(&value_of).unwrap().max(0) as usize]).collect();
    let put = |mem: &mut Vec<u8>, data: &[f64], int: bool| {
        mem.clear();
        for &v in data {
            if int {
                mem.extend_from_slice(&(v as i32).to_le_bytes());
            } else {
                mem.extend_from_slice(&(v as f32).to_le_bytes());
            }
        }
    };
    for &bi in &s.inputs {
        put(&mut memory[bi], &tokens.data, s.buffers[bi].name.as_deref() == Some("tokens"));
    }
    for (&bi, t) in s.params.iter().zip(&params) {
        put(&mut memory[bi], &t.data, false);
    }

    let mut worst = 0f32;
    for (si, step) in s.steps.iter().enumerate() {
        let k = &s.kernels[step.kernel];
        let mut want: Vec<Buffer> =
            k.buffers.iter().zip(&step.buffers).map(|(d, &g)| to_typed(&memory[g], d.elem)).collect();
        let mut got = want.clone();
        exec::run_all(k, &mut want, &args).unwrap_or_else(|e| panic!("{model} step {si}: {e}"));
        let name = &dedup.names[&k.name];
        let f: libloading::Symbol<KernelFn> = unsafe { lib.get(name.as_bytes()) }.unwrap();
        let ptrs: Vec<*mut c_void> = got.iter_mut().map(Buffer::as_mut_ptr).collect();
        let extent = int(&k.extent, &args);
        unsafe {
            f(ptrs.as_ptr(), args.as_ptr(), 0, extent / 2);
            f(ptrs.as_ptr(), args.as_ptr(), extent / 2, extent);
        }
        for (bi, (g, w)) in got.iter().zip(&want).enumerate() {
            let decl = &k.buffers[bi];
            if decl.access == Access::Read {
                continue;
            }
            let at = format!("{model} step {si} kernel `{}` buffer `{}`", k.name, decl.name);
            match (g, w) {
                (Buffer::F32(g), Buffer::F32(w)) => {
                    let scale = w.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
                    for (j, (&a, &e)) in g.iter().zip(w).enumerate() {
                        if a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()) {
                            continue;
                        }
                        // Relative to the element, with a floor of the buffer's scale for
                        // values that are small by cancellation.
                        let err = (a - e).abs() / e.abs().max(1e-3 * scale).max(f32::MIN_POSITIVE);
                        worst = worst.max(err);
                        assert!(err <= 1e-5, "{at}[{j}]: generated {a:e}, executor {e:e}");
                    }
                }
                (g, w) => assert_eq!(g, w, "{at}"),
            }
        }
        for (view, &gb) in want.iter().zip(&step.buffers) {
            memory[gb] = to_bytes(view, memory[gb].len());
        }
    }
    eprintln!(
        "{model}: {} kernels ({} emitted), {} steps, worst relative difference {worst:e}",
        s.kernels.len(),
        dedup.kernels.len(),
        s.steps.len()
    );
    drop(lib);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_model_runs_compiled_like_the_executor() {
    let target = CpuTarget::parse("native").unwrap();
    for path in model_files() {
        for recognize in [false, true] {
            check_model(&path, recognize, passes::Policy::F32, &target, CodeGen::Llvm);
        }
    }
}

/// The same with Cranelift writing the kernels.
#[test]
fn every_model_runs_compiled_by_cranelift_like_the_executor() {
    let target = CpuTarget::parse("native").unwrap();
    for path in model_files() {
        for recognize in [false, true] {
            check_model(&path, recognize, passes::Policy::F32, &target, CodeGen::Cranelift);
        }
    }
}

/// The same with 16-bit products (bf16 and f16 casts, 16-bit buffers: loads widen, stores
/// round), unrecognized, so that every product is a generated loop nest reading them; the
/// 16-bit buffers must match the executor's bit for bit.
#[test]
fn every_model_with_sixteen_bit_products_runs_compiled_like_the_executor() {
    let target = CpuTarget::parse("native").unwrap();
    for (i, path) in model_files().into_iter().enumerate() {
        let precision = if i % 2 == 0 { passes::Policy::Bf16 } else { passes::Policy::F16 };
        for codegen in CodeGen::ALL {
            check_model(&path, false, precision, &target, codegen);
        }
    }
}
