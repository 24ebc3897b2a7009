//! Compiled bundles end to end: every model compiled for the host CPU with LLVM, run by
//! the runtime (no interpreter involved), matches the interpreter in f64 within 1e-4
//! relative L2 for the loss and every gradient — one bundle run at three lengths (not
//! multiples of the Diag block), with B = 3 once; compiled with 16-bit products
//! (`--precision bf16` and `f16`), it matches the interpreter on the same narrowed graph
//! and, loosely, the f64 one. Plus: corrupt bundles are refused with an error naming the
//! problem, and the runtime crate links neither LLVM nor the compiler.

mod common;
use common::*;
use std::collections::HashMap;
use tnc_compiler::backend::GpuGemm;
use tnc_compiler::interp::{compare, evaluate, EvalOptions, Precision};
use tnc_compiler::passes::Policy;
use tnc_compiler::{driver, passes};

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tnc-bundles-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn to_rt(t: &tnc_compiler::interp::Tensor, int: bool) -> tnc_runtime::Tensor {
    if int {
        tnc_runtime::Tensor::i32(t.shape.clone(), t.data.iter().map(|&x| x as i32).collect())
    } else {
        tnc_runtime::Tensor::f32(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect())
    }
}

#[test]
fn every_model_compiled_for_the_host_matches_the_interpreter() {
    for path in model_files() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let tag = path.file_stem().unwrap().to_string_lossy().into_owned();
        compiled_matches_the_interpreter(&tag, g, &[(2, 5), (3, 6), (1, 14)], Policy::F32);
    }
}

/// Every model with bf16 (and one with f16) products, against two references:
/// - the interpreter on the graph as compiled (its products' operands narrowed the same
///   way) in f32: within 1e-2 relative L2 (measured: ≤ 1e-4). Tight enough to catch a
///   product read in f32 or narrowed twice (off by ~2^-8 ≈ 4e-3 in every value); not 1e-4,
///   because a value computed in another order can round to the neighbouring 16-bit
///   number, which the ill-conditioned gradients of the DiagAttention layers amplify;
/// - the f64 interpreter on the f32 model: the loss within 1e-2 (measured ≤ 3e-3) and
///   every gradient within a cosine of 0.95 of f64's (the direction training follows).
///   Not a relative L2 bound: 8 bits of mantissa move some gradients of these tiny models
///   far (TNL's first-layer projections by 0.28 relative L2 in bf16, 0.012 in f16 — a
///   property of the precision, since the narrowed interpreter agrees with the bundle).
#[test]
fn every_model_with_sixteen_bit_products_matches_the_interpreter() {
    for (i, path) in model_files().into_iter().enumerate() {
        let (sources, g) = elaborate_path(&path, &tiny_sets(&path));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let policy = if i == 0 { Policy::F16 } else { Policy::Bf16 };
        let tag = format!("{}-{}", path.file_stem().unwrap().to_string_lossy(), policy.name());
        compiled_matches_the_interpreter(&tag, g, &[(2, 9)], policy);
    }
}

/// bf16 products on a GPU's tensor cores (`mma.sync`), run by the emulated GPU, which
/// computes each warp's product from the fragments its threads hold: T1 and the block
/// attention of MQAR's T2, at lengths that are not multiples of 16, against the same two
/// references and tolerances as the host's bf16 bundles.
#[test]
fn bf16_products_on_tensor_cores_match_the_interpreter() {
    // T1 wider than the other tests' models, so that products span several k-tiles of 32
    // and partial ones (dim 40, GLU 56, vocabulary 70).
    let wide: Vec<String> = ["vocab=70", "dim=40", "heads=2", "layers=1", "glu_dim=56"].map(String::from).into();
    for (model, sets) in [("models/transnormer_t1.tn", Some(wide)), ("models/tasks/mqar_t2.tn", None)] {
        let path = repo().join(model);
        let (sources, g) = elaborate_path(&path, &sets.unwrap_or_else(|| tiny_sets(&path)));
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let tag = format!("{}-sm80-bf16", path.file_stem().unwrap().to_string_lossy());
        let start = std::time::Instant::now();
        compiled_for_matches_the_interpreter(&tag, g, &[(2, 9), (1, 21)], Policy::Bf16, "sm80", GpuGemm::Tiles);
        eprintln!("{tag}: {:.1} s", start.elapsed().as_secs_f64());
    }
}

/// A vocabulary of 2,100 words: the cross-entropy's library GEMMs run in three chunks
/// (1,024, 1,024 and 52 words), the chunk's first word a launch argument that their views'
/// polynomials use, so two GEMM kernels serve every chunk.
#[test]
fn a_vocabulary_in_three_chunks_matches_the_interpreter() {
    let text = "use std\nmodel m(vocab = 2100, dim = 32) {\n  input tokens: i32[B, N]\n  \
                param embedding: [vocab, dim] ~ normal(0.5)\n  x = srms_norm(embed(tokens, embedding))\n  \
                output loss = lm_loss(x, embedding, tokens)\n}\n";
    let (sources, g) = elaborate_text("chunks.tn", text, &[]);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    compiled_matches_the_interpreter("chunks", g.clone(), &[(2, 7)], Policy::F32);
    // The chunks' probabilities in bf16, a workspace of their own (not in place).
    compiled_matches_the_interpreter("chunks-bf16", g, &[(2, 7)], Policy::Bf16);
}

/// `--gemm cublas` on the emulated GPU, which runs each product as the cuBLAS calls the
/// CUDA device would make (`cublas_plan`), with cuBLAS's semantics: T1's projections and
/// their gradients (row-major, transposed, weight gradients) in f32 and bf16, and the
/// cross-entropy's vocabulary chunks (launch arguments in the views, `C +=` products).
#[test]
fn cublas_products_on_the_emulated_gpu_match_the_interpreter() {
    let wide: Vec<String> = ["vocab=2100", "dim=40", "heads=2", "layers=1", "glu_dim=56"].map(String::from).into();
    let path = repo().join("models/transnormer_t1.tn");
    let (sources, g) = elaborate_path(&path, &wide);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    for precision in [Policy::F32, Policy::Bf16] {
        let tag = format!("t1-sm80-cublas-{}", precision.name());
        compiled_for_matches_the_interpreter(&tag, g.clone(), &[(2, 9)], precision, "sm80", GpuGemm::Cublas);
    }
}

/// How a bundle's outputs are compared with a reference.
#[derive(Clone, Copy, Debug)]
enum Check {
    /// Every tensor within this relative L2.
    RelL2(f64),
    /// The loss within this relative L2, every gradient within this cosine.
    LossAndCosine(f64, f64),
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
}

/// Compile `g` for the host with `precision`, run forward and backward at each (B, N),
/// and compare the loss and every gradient with the interpreter (see the tests above for
/// the references and tolerances of each precision).
fn compiled_matches_the_interpreter(
    tag: &str,
    g: tnc_compiler::ir::Graph,
    lengths: &[(usize, usize)],
    precision: Policy,
) {
    compiled_for_matches_the_interpreter(tag, g, lengths, precision, "native", GpuGemm::Tiles)
}

/// The same for `target`: the host CPU, or a GPU target (its products as `gemm` says) run
/// on the emulated GPU.
fn compiled_for_matches_the_interpreter(
    tag: &str,
    g: tnc_compiler::ir::Graph,
    lengths: &[(usize, usize)],
    precision: Policy,
    target: &str,
    gemm: GpuGemm,
) {
    let dir = scratch(tag);
    let opts = driver::Options { precision, gemm, ..Default::default() };
    driver::compile(g.clone(), target, &dir, opts, Vec::new()).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let narrowed = (precision != Policy::F32).then(|| {
        let last = passes::names().last().copied().unwrap();
        passes::run_until_with(g.clone(), last, precision).unwrap().unwrap()
    });
    let reference = passes::differentiate_loss(g).unwrap();
    // Parameters rounded to f32 for both sides.
    let params = rounded_to_f32(perturbed_params(&reference, 9));
    let mut exec = if target == "native" {
        tnc_runtime::Executor::cpu(&tnc_runtime::Bundle::load_cpu(&dir).unwrap(), 2).unwrap()
    } else {
        let bundle = tnc_runtime::Bundle::load(&dir).unwrap();
        let library = bundle.manifest.kernels.iter().filter(|k| k.library).count();
        assert_eq!(library > 0, gemm == GpuGemm::Cublas, "{tag}: {library} library products");
        let gpu = tnc::emulated_gpu::EmulatedGpu::new(&bundle).unwrap();
        tnc_runtime::Executor::on(&bundle, Box::new(gpu)).unwrap()
    };
    exec.set_debug_nan(true);
    let pfile = dir.with_extension("params.safetensors");
    let named: Vec<(String, &tnc_compiler::interp::Tensor)> =
        reference.params.iter().map(|p| p.name.clone()).zip(params.iter()).collect();
    tnc_compiler::interp::write_safetensors(&pfile, &named, tnc_compiler::interp::FileDType::F32).unwrap();
    exec.set_params_from_file(&pfile).unwrap();
    let vocab = reference.params.iter().find(|p| p.name == "embedding").unwrap().ty.shape[0].as_const().unwrap();
    for &(b, n) in lengths {
        let tokens = token_tensor(b, n, vocab as usize, (b * n) as u64);
        let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
        let want = evaluate(&reference, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&reference);
        // The f64 reference, and with 16-bit products the narrowed graph in f32.
        let mut references =
            vec![(want, if narrowed.is_some() { Check::LossAndCosine(1e-2, 0.95) } else { Check::RelL2(1e-4) })];
        if let Some(n) = &narrowed {
            let f32_eval = EvalOptions { precision: Precision::F32, ..EvalOptions::default() };
            references.push((evaluate(n, &inputs, &params, &f32_eval).unwrap().outputs(n), Check::RelL2(1e-2)));
        }
        let t = to_rt(&tokens, true);
        exec.forward(&[("tokens", &t)]).unwrap_or_else(|e| panic!("{tag}: {e}"));
        exec.backward(&[]).unwrap();
        for (want, check) in &references {
            for (name, w) in want {
                let got = exec.output(name).unwrap_or_else(|e| panic!("{tag}: {e}"));
                let data: Vec<f64> = got.as_f32().unwrap().iter().map(|&x| x as f64).collect();
                let got = tnc_compiler::interp::Tensor { shape: w.shape.clone(), data };
                let c = compare(&got, w);
                let tiny = c.max_abs < 1e-6; // within f32 resolution of every element
                let ok = match *check {
                    Check::LossAndCosine(_, min_cos) if name != "loss" => cosine(&got.data, &w.data) >= min_cos,
                    Check::LossAndCosine(tol, _) | Check::RelL2(tol) => c.within(tol),
                };
                let cos = cosine(&got.data, &w.data);
                assert!(ok || (tiny && !c.has_nan), "{tag} B={b} N={n} `{name}` ({check:?}): {c:?}, cosine {cos}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&pfile);
}

#[test]
fn corrupt_bundles_are_refused_with_the_reason() {
    let path = repo().join("models/tnl.tn");
    let (_, g) = elaborate_path(&path, &["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"].map(String::from));
    let dir = scratch("corrupt");
    driver::compile(g.unwrap(), "x86-64-v3", &dir, Default::default(), Vec::new()).unwrap();
    assert!(tnc_runtime::Bundle::load_cpu(&dir).is_ok());
    let so = dir.join("kernels.so");
    let bytes = std::fs::read(&so).unwrap();
    std::fs::write(&so, &bytes[..bytes.len() / 2]).unwrap();
    let err = tnc_runtime::Bundle::load_cpu(&dir).unwrap_err().to_string();
    assert!(err.contains("kernels.so"), "{err}");
    std::fs::write(&so, &bytes).unwrap();
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let current = format!("\"format_version\": {}", tnc_runtime::FORMAT_VERSION);
    let future = format!("\"format_version\": {}", tnc_runtime::FORMAT_VERSION + 1);
    assert!(text.contains(&current), "the manifest states its version: {text}");
    std::fs::write(&manifest, text.replace(&current, &future)).unwrap();
    let err = tnc_runtime::Bundle::load_cpu(&dir).unwrap_err().to_string();
    assert!(err.contains("manifest"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_targets_list_the_valid_ones() {
    let path = repo().join("models/tnl.tn");
    let (_, g) = elaborate_path(&path, &["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"].map(String::from));
    let err =
        driver::compile(g.unwrap(), "pentium3", &scratch("bad-target"), Default::default(), Vec::new()).err().unwrap();
    assert!(err.contains("x86-64-v4") && err.contains("native"), "{err}");
}

/// `cargo tree` of `package`'s normal and build dependencies, one crate per line, with
/// `args` (features) added.
fn cargo_tree(package: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "-p", package, "--edges", "normal,build", "--prefix", "none"])
        .args(args)
        .current_dir(repo())
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_runtime_links_neither_llvm_nor_the_compiler() {
    let tree = cargo_tree("tnc-runtime", &[]);
    assert!(tree.contains("tnc-runtime"), "{tree}");
    for forbidden in ["inkwell", "llvm-sys", "tnc-compiler", "cranelift"] {
        assert!(!tree.contains(forbidden), "the runtime depends on {forbidden}:\n{tree}");
    }
}

/// The compiler shares the bundle format and the bit-for-bit numerics with the runtime
/// through `tnc-bundle`, and depends on neither the runtime nor a device (no CUDA driver
/// bindings, no command-line parser).
#[test]
fn the_compiler_does_not_depend_on_the_runtime() {
    let tree = cargo_tree("tnc-compiler", &[]);
    assert!(tree.contains("tnc-compiler") && tree.contains("tnc-bundle"), "{tree}");
    for forbidden in ["tnc-runtime", "cudarc", "clap"] {
        assert!(!tree.contains(forbidden), "the compiler depends on {forbidden}:\n{tree}");
    }
}

/// `tnc` built without its default features but with `cranelift` needs no LLVM: no
/// inkwell, no llvm-sys in its dependency tree (with the defaults, both are there).
/// CI builds that configuration too (`.ci/run`).
#[test]
fn without_the_llvm_feature_tnc_depends_on_no_llvm() {
    let without = cargo_tree("tnc", &["--no-default-features", "--features", "cranelift"]);
    assert!(without.contains("cranelift-codegen") && without.contains("tnc-compiler"), "{without}");
    for forbidden in ["inkwell", "llvm-sys"] {
        assert!(!without.contains(forbidden), "tnc without `llvm` depends on {forbidden}:\n{without}");
    }
    let with = cargo_tree("tnc", &[]);
    assert!(with.contains("inkwell") && with.contains("cranelift-codegen"), "{with}");
}

/// N = 1 end to end: a model whose loss is defined for one position (the benchmark's
/// linear attention, loss mean(o²)) matches the interpreter in the loss and every
/// gradient at N = 1 (and, with the same bundle, at N = 65, past one chunk). A language
/// model at N = 1 has no token to predict: its loss is a mean over nothing, NaN in the
/// bundle exactly as in the interpreter, and the run itself neither fails nor crashes.
#[test]
fn one_position_runs_end_to_end() {
    let path = repo().join("models/bench/linear_attention.tn");
    let (sources, g) = elaborate_path(&path, &["heads=2", "head_dim=4"].map(String::from));
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let dir = scratch("n1");
    driver::compile(g.clone(), "native", &dir, Default::default(), Vec::new()).unwrap();
    let reference = passes::differentiate_loss(g).unwrap();
    let params = tnc_compiler::interp::init_params(&reference, 0).unwrap();
    let bundle = tnc_runtime::Bundle::load_cpu(&dir).unwrap();
    let mut exec = tnc_runtime::Executor::cpu(&bundle, 2).unwrap();
    exec.set_debug_nan(true);
    exec.set_params_from_seed(0).unwrap();
    for (b, n) in [(3usize, 1usize), (2, 65)] {
        let input = |salt: u64| {
            let data = (0..b * 2 * n * 4).map(|i| tnc_runtime::rng::normal(salt, 1, i as u64, 0)).collect();
            tnc_compiler::interp::Tensor::new(vec![b, 2, n, 4], data).unwrap()
        };
        let (q, k, v) = (input(1), input(2), input(3));
        let inputs =
            HashMap::from([("q".to_string(), q.clone()), ("k".to_string(), k.clone()), ("v".to_string(), v.clone())]);
        let want = evaluate(&reference, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&reference);
        let (q, k, v) = (to_rt(&q, false), to_rt(&k, false), to_rt(&v, false));
        exec.forward(&[("q", &q), ("k", &k), ("v", &v)]).unwrap();
        exec.backward(&[]).unwrap();
        for (name, w) in want {
            let got = exec.output(&name).unwrap();
            let data: Vec<f64> = got.as_f32().unwrap().iter().map(|&x| x as f64).collect();
            let c = compare(&tnc_compiler::interp::Tensor { shape: w.shape.clone(), data }, &w);
            assert!(c.within(1e-4), "B={b} N={n} `{name}`: {c:?}");
        }
    }

    // A language model at N = 1.
    let path = repo().join("models/transnormer_t2.tn");
    let (_, g) = elaborate_path(&path, &tiny_sets(&path));
    let g = g.unwrap();
    let dir = scratch("n1-lm");
    driver::compile(g.clone(), "native", &dir, Default::default(), Vec::new()).unwrap();
    let reference = passes::differentiate_loss(g).unwrap();
    let params = tnc_compiler::interp::init_params(&reference, 0).unwrap();
    let tokens = token_tensor(2, 1, 32, 1);
    let inputs = HashMap::from([("tokens".to_string(), tokens.clone())]);
    let want = evaluate(&reference, &inputs, &params, &EvalOptions::default()).unwrap().outputs(&reference);
    let loss = &want.iter().find(|(n, _)| n == "loss").unwrap().1;
    assert!(loss.data[0].is_nan(), "the interpreter's loss over no token is NaN");
    let bundle = tnc_runtime::Bundle::load_cpu(&dir).unwrap();
    let mut exec = tnc_runtime::Executor::cpu(&bundle, 2).unwrap();
    exec.set_params_from_seed(0).unwrap();
    exec.forward(&[("tokens", &to_rt(&tokens, true))]).unwrap();
    assert!(exec.output("loss").unwrap().as_f32().unwrap()[0].is_nan(), "so is the bundle's");
}
