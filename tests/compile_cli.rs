//! `tnc compile`: `--report` prints kernels and the memory plan; without it, a bundle for
//! a CPU or GPU target (`--precision`, `--backend`, `--gemm`), and bad usage is exit 2.

mod common;
use common::repo;
use std::path::Path;
use std::process::Command;

fn tnc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tnc")).args(args).current_dir(repo()).output().expect("tnc runs");
    (
        out.status.code().expect("exited normally, not by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TINY: [&str; 8] = ["--set", "vocab=32", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2"];

#[test]
fn report_prints_kernels_and_the_peak() {
    let mut args = vec!["compile", "models/transnormer_t1.tn", "--report", "--batch", "2", "--seq", "128"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("at B = 2, N = 128"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("kernel") && l.contains("contraction") && l.contains("flops")), "{out}");
    let peak = out.lines().find(|l| l.starts_with("peak ")).unwrap_or_else(|| panic!("no peak line: {out}"));
    assert!(peak.contains("bytes") && peak.contains("MiB") && peak.contains("activations"), "{peak}");
    assert!(out.contains("activation bytes per token:"), "{out}");
    assert!(out.contains("activation memory grows linearly with N"), "{out}");
}

#[test]
fn default_sizes_are_b1_n2048() {
    let mut args = vec!["compile", "models/tnl.tn", "--report"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("at B = 1, N = 2048"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("peak ")), "{out}");
}

#[test]
fn without_a_target_it_asks_for_one() {
    let (code, out, err) = tnc(&["compile", "models/transnormer_t1.tn"]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("needs `--target`"), "{err}");
    assert!(err.contains("sm80") && err.contains("x86-64-v4"), "{err}");
    assert!(err.contains("--report"), "{err}");
}

#[test]
fn compiling_writes_a_bundle_and_unknown_targets_are_usage_errors() {
    // (One directory for both targets: the second bundle replaces the first.)
    let dir = std::env::temp_dir().join(format!("tnc-compile-cli-{}", std::process::id()));
    let out = dir.join("tnl.tnb");
    let out_s = out.display().to_string();
    for target in ["x86-64-v3", "sm80"] {
        let mut args = vec!["compile", "models/tnl.tn", "--target", target, "-o", &out_s];
        args.extend(TINY);
        let (code, stdout, err) = tnc(&args);
        assert_eq!(code, 0, "{target}: {err}");
        assert!(stdout.contains("kernels") && stdout.contains("compile time"), "{stdout}");
        let code_file = if target.starts_with("sm") { "kernels.ptx" } else { "kernels.so" };
        assert!(out.join("manifest.json").is_file() && out.join(code_file).is_file(), "{target}");
        if target == "x86-64-v3" {
            std::fs::write(out.join("notes.txt"), "mine").unwrap();
        }
    }
    // The GPU bundle replaced the CPU one in place: the old bundle's code is gone, a file
    // of the user's is not.
    assert!(!out.join("kernels.so").exists(), "a stale kernels.so is left behind");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    let (code, _, err) = tnc(&["compile", "models/tnl.tn", "--target", "sm100", "-o", &out_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sm90a"), "{err}");
    let (code, _, err) = tnc(&["compile", "models/tnl.tn", "--target", "pentium", "-o", &out_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("native") && err.contains("sm80"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_keep_their_exit_codes() {
    assert_eq!(tnc(&["compile", "models/transnormer_t1.tn", "--report", "--seq", "0"]).0, 2, "N ≥ 1");
    assert_eq!(tnc(&["compile", "models/transnormer_t1.tn", "--report", "--set", "layres=2"]).0, 2);
    assert_eq!(tnc(&["compile", "tests/malformed/unknown_name_typo.tn", "--report"]).0, 1);
    // A hyper-parameter set twice is refused, not decided by order.
    let (code, _, err) = tnc(&["compile", "models/tnl.tn", "--report", "--set", "dim=32", "--set", "dim=64"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`dim` is set twice") && err.contains("set here first"), "{err}");
    // An unknown target is bad usage in every command that compiles, found before compiling.
    assert_eq!(tnc(&["compile", "models/tnl.tn", "--report", "--emit", "llvm"]).0, 2, "--emit with --report");
    for cmd in
        [&["train", "models/tasks/mqar_t2.tn", "--out"][..], &["generate", "models/tasks/mqar_t2.tn", "--prompt", "1"]]
    {
        let mut args = cmd.to_vec();
        if cmd[0] == "train" {
            args.push("/nonexistent/run");
        }
        args.extend(["--target", "sm100"]);
        let (code, _, err) = tnc(&args);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(err.contains("sm90a") && !err.contains("compiling"), "{cmd:?}: {err}");
    }
}

#[test]
fn ir_after_fuse_prints_the_plan() {
    let mut args = vec!["ir", "models/tnl.tn", "--after", "fuse"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("fusion tnl {"), "{out}");
    assert!(out.contains("kernel 0 "), "{out}");
    let (code, _, err) = tnc(&["ir", "models/tnl.tn", "--after", "fsue"]);
    assert_eq!(code, 2);
    assert!(err.contains("fuse"), "{err}");
}

#[test]
fn cuda_bundles_run_or_say_there_is_no_driver() {
    let dir = std::env::temp_dir().join(format!("tnc-cuda-cli-{}", std::process::id()));
    let out = dir.join("tnl.tnb").display().to_string();
    let mut args = vec!["compile", "models/tnl.tn", "--target", "sm80", "-o", &out];
    args.extend(TINY);
    assert_eq!(tnc(&args).0, 0);
    let inputs = dir.join("in.safetensors");
    let tokens = tnc_compiler::interp::Tensor::new(vec![1, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    tnc_compiler::interp::write_safetensors(
        &inputs,
        &[("tokens".into(), &tokens)],
        tnc_compiler::interp::FileDType::I32,
    )
    .unwrap();
    let result = dir.join("out.safetensors");
    let (inp, res) = (inputs.display().to_string(), result.display().to_string());
    let (code, _, err) = tnc(&["run", &out, "--device", "cuda", "--inputs", &inp, "--out", &res, "--grad"]);
    if tnc_runtime::cuda::driver_present() {
        assert_eq!(code, 0, "{err}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("no CUDA driver found"), "{err}");
    }
    // `tnc verify --device cuda` takes the same path: it runs, or says why it cannot.
    let mut verify = vec!["verify", "models/tnl.tn", "--device", "cuda"];
    verify.extend(TINY);
    let (code, _, err) = tnc(&verify);
    if tnc_runtime::cuda::driver_present() {
        assert_eq!(code, 0, "{err}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("no CUDA driver found"), "{err}");
    }
    // Without `--device`, a GPU bundle runs where its target does; on the CPU it is
    // refused (bad usage) with the reason and what to pass instead.
    let (code, _, err) = tnc(&["run", &out, "--inputs", &inp, "--out", &res]);
    if tnc_runtime::cuda::driver_present() {
        assert_eq!(code, 0, "{err}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("no CUDA driver found") && err.contains("--device emulated"), "{err}");
    }
    let (code, _, err) = tnc(&["run", &out, "--device", "cpu", "--inputs", &inp, "--out", &res]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`--device cpu` cannot run a bundle for sm80") && err.contains("--device cuda"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--precision bf16`: `tnc ir --after precision` shows the narrowed products; a compiled
/// bundle's products read bf16 buffers (and so does the GPU one); `tnc verify` passes at
/// its 16-bit tolerance; `tnc run` on the model evaluates it as compiled and refuses the
/// flag on a bundle; an unknown precision is bad usage.
#[test]
fn bf16_products_from_the_command_line() {
    let mut args = vec!["ir", "models/tnl.tn", "--after", "precision", "--precision", "bf16"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cast[bf16]") && out.contains(": bf16["), "{out}");
    let dir = std::env::temp_dir().join(format!("tnc-compile-cli-bf16-{}", std::process::id()));
    for target in ["native", "sm80"] {
        let out = dir.join(format!("{target}.tnb"));
        let out_s = out.display().to_string();
        let mut args = vec!["compile", "models/tnl.tn", "--target", target, "--precision", "bf16", "-o", &out_s];
        args.extend(TINY);
        let (code, _, err) = tnc(&args);
        assert_eq!(code, 0, "{target}: {err}");
        let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
        assert!(manifest.contains("\"elem\": \"bf16\""), "{target}: no bf16 buffer in the manifest");
    }
    let mut args = vec!["verify", "models/tnl.tn", "--precision", "bf16"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("match within 0.01"), "{out}");
    let (code, _, err) = tnc(&["compile", "models/tnl.tn", "--target", "native", "--precision", "bf8"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bf16"), "{err}");
    let bundle = dir.join("native.tnb").display().to_string();
    let (code, _, err) = tnc(&["run", &bundle, "--inputs", "x", "--out", "y", "--precision", "bf16"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("compiled with"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CPU bundle that cannot fit this machine at the summary's sizes is compiled, with a
/// warning naming both figures: a softmax decode step with a KV cache of 2³² positions
/// (over a terabyte, more than any machine the suite runs on).
#[test]
fn a_bundle_larger_than_this_machine_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("tnc-compile-cli-huge-{}", std::process::id()));
    let out = dir.join("huge.tnb").display().to_string();
    let mut args = vec!["compile", "models/transformer.tn", "--target", "native", "--decode-step", "4294967295"];
    args.extend(["-o", &out]);
    args.extend(TINY);
    let (code, stdout, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: at B = 1, N = 2048 the bundle needs") && err.contains("TiB"), "{err}");
    assert!(err.contains("more than this machine's"), "{err}");
    assert!(stdout.contains("compiled transformer"), "{stdout}");
    // A bundle that fits says nothing of it.
    let small = dir.join("small.tnb").display().to_string();
    let mut args = vec!["compile", "models/transformer.tn", "--target", "native", "--decode-step", "64", "-o", &small];
    args.extend(TINY);
    let (code, _, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--gemm cublas`: a GPU bundle whose dense products are cuBLAS calls (library nodes,
/// no PTX of ours), said in the summary; the emulated GPU runs it (each product as the
/// cuBLAS calls the CUDA device would make) and gives the tiles bundle's outputs and
/// gradients (both sum each element's terms in order in f32: within 1e-5); a CPU target
/// or an unknown choice is bad usage.
#[test]
fn cublas_products_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("tnc-compile-cli-cublas-{}", std::process::id()));
    let inputs = dir.join("in.safetensors");
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = tnc_compiler::interp::Tensor::new(vec![2, 5], (0..10).map(|i| (i * 7 % 32) as f64).collect()).unwrap();
    tnc_compiler::interp::write_safetensors(
        &inputs,
        &[("tokens".into(), &tokens)],
        tnc_compiler::interp::FileDType::I32,
    )
    .unwrap();
    let mut results = Vec::new();
    for gemm in ["tiles", "cublas"] {
        let out = dir.join(format!("{gemm}.tnb")).display().to_string();
        let mut args = vec!["compile", "models/transnormer_t1.tn", "--target", "sm80", "--gemm", gemm, "-o", &out];
        args.extend(TINY);
        let (code, stdout, err) = tnc(&args);
        assert_eq!(code, 0, "{err}");
        let manifest = std::fs::read_to_string(Path::new(&out).join("manifest.json")).unwrap();
        assert_eq!(stdout.contains("(cuBLAS for "), gemm == "cublas", "{stdout}");
        assert_eq!(manifest.contains("\"library\": true"), gemm == "cublas", "{gemm}");
        let res = dir.join(format!("{gemm}.out.safetensors"));
        let (inp, res_s) = (inputs.display().to_string(), res.display().to_string());
        let (code, _, err) = tnc(&["run", &out, "--device", "emulated", "--inputs", &inp, "--out", &res_s, "--grad"]);
        assert_eq!(code, 0, "{gemm}: {err}");
        results.push(tnc_compiler::interp::read_safetensors(&res).unwrap());
    }
    let (tiles, cublas) = (&results[0], &results[1]);
    assert!(tiles.len() > 10 && tiles.len() == cublas.len(), "{} and {} tensors", tiles.len(), cublas.len());
    for ((name, t), (other, c)) in tiles.iter().zip(cublas) {
        assert_eq!(name, other);
        let close = t.data.iter().zip(&c.data).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + a.abs()));
        assert!(close, "`{name}` differs between the tiles and the cuBLAS bundle");
    }
    // `tnc verify` compiles with the choice and checks it against the interpreter.
    let mut args = vec!["verify", "models/tnl.tn", "--device", "emulated", "--gemm", "cublas"];
    args.extend(TINY);
    let (code, out, err) = tnc(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("match within 0.0001"), "{out}");
    for cmd in [&["compile", "models/tnl.tn", "--target", "native"][..], &["compile", "models/tnl.tn", "--report"]] {
        let (code, _, err) = tnc(&[cmd, &["--gemm", "cublas"]].concat());
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(err.contains("`--gemm cublas` is for GPU targets"), "{cmd:?}: {err}");
    }
    let (code, _, err) = tnc(&["compile", "models/tnl.tn", "--target", "sm80", "--gemm", "cutlass"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tiles") && err.contains("cublas"), "{err}");
    // `tnc train` takes the choice too, checked before anything compiles, and refuses it
    // with a bundle, which is compiled already.
    let args = ["train", "models/tasks/mqar_t2.tn", "--out", "/nonexistent/run", "--gemm", "cublas"];
    let (code, _, err) = tnc(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`--gemm cublas` is for GPU targets") && !err.contains("compiling"), "{err}");
    let bundle = dir.join("cublas.tnb").display().to_string();
    let (code, _, err) =
        tnc(&["train", &bundle, "--data", "copy:vocab=16", "--out", "/nonexistent/run", "--gemm", "cublas"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("need a .tn model"), "{err}");
    // The choice is part of the compile cache's key: tiles, then cuBLAS, then cuBLAS again.
    let cache = dir.join("cache");
    let train = |gemm: &str, run: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tnc"))
            .current_dir(repo())
            .env("TNC_CACHE_DIR", &cache)
            .args(["train", "models/tasks/mqar_t2.tn", "--data", "copy:vocab=16", "--steps", "2", "--seq", "16"])
            .args(["--batch", "2", "--eval-batches", "1", "--device", "emulated", "--gemm", gemm, "--quiet"])
            .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=1", "--set", "block=8"])
            .arg("--out")
            .arg(dir.join(run))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let tiles = train("tiles", "run-tiles");
    assert!(tiles.contains("compiling") && !tiles.contains("cuBLAS"), "{tiles}");
    let cublas = train("cublas", "run-cublas");
    assert!(cublas.contains("compiling") && cublas.contains("with cuBLAS products"), "{cublas}");
    assert!(train("cublas", "run-cublas-again").contains("using the cached bundle"));
    let kept = std::fs::read_to_string(dir.join("run-cublas/bundle/manifest.json")).unwrap();
    assert!(kept.contains("\"library\": true"), "the cuBLAS run's bundle has library products");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--backend cranelift`: a CPU bundle written by Cranelift, its Cranelift IR and
/// disassembly with `--emit`, `tnc verify` against the interpreter; a GPU target is a
/// usage error naming the back end it needs, before anything compiles.
#[test]
fn cranelift_writes_cpu_bundles_that_verify() {
    let dir = std::env::temp_dir().join(format!("tnc-compile-cli-cranelift-{}", std::process::id()));
    let out = dir.join("tnl.tnb");
    let out_s = out.display().to_string();
    let mut args = vec!["compile", "models/tnl.tn", "--target", "native", "--backend", "cranelift", "-o", &out_s];
    args.extend(["--emit", "llvm", "--emit", "asm"]);
    args.extend(TINY);
    let (code, stdout, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("for native with cranelift"), "{stdout}");
    assert!(out.join("manifest.json").is_file() && out.join("kernels.so").is_file());
    let clif = std::fs::read_to_string(dir.join("tnl.tnb.clif")).expect("--emit llvm writes the Cranelift IR");
    let asm = std::fs::read_to_string(dir.join("tnl.tnb.s")).expect("--emit asm writes the disassembly");
    assert!(clif.contains("; kernel ") && clif.contains("function "), "{}", &clif[..clif.len().min(500)]);
    assert!(asm.lines().any(|l| l.ends_with(':')) && asm.contains("ret"), "{}", &asm[..asm.len().min(500)]);

    // Cranelift writes no AVX-512 code, so its x86-64-v4 bundle does not require it.
    let mut args = vec!["compile", "models/tnl.tn", "--target", "x86-64-v4", "--backend", "cranelift", "-o", &out_s];
    args.extend(TINY);
    let (code, _, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"fma\"") && !manifest.contains("avx512f"), "{manifest}");

    let mut args = vec!["verify", "models/transnormer_t1.tn", "--backend", "cranelift"];
    args.extend(TINY);
    let (code, stdout, err) = tnc(&args);
    assert_eq!(code, 0, "{err}\n{stdout}");
    assert!(stdout.contains("tensors match within"), "{stdout}");

    for command in [&["compile"][..], &["verify", "--device", "emulated"]] {
        let mut args = command.to_vec();
        args.extend(["models/tnl.tn", "--target", "sm80", "--backend", "cranelift"]);
        let (code, _, err) = tnc(&args);
        assert_eq!(code, 2, "{command:?}: {err}");
        assert!(err.contains("CPU code only") && err.contains("--backend llvm"), "{command:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The report's total FLOPs at B 1 and N = 64, 128, 192: the second difference
/// `f(3N) − 2f(2N) + f(N)` is `2aN²` for a cost `aN² + bN + c`.
fn second_difference_of_flops(model: &str, sets: &[&str]) -> i128 {
    let total = |n: &str| -> i128 {
        let mut args = vec!["compile", model, "--report", "--seq", n];
        args.extend(sets);
        let (code, out, err) = tnc(&args);
        assert_eq!(code, 0, "{err}");
        let line = out.lines().find(|l| l.starts_with("total: ")).unwrap_or_else(|| panic!("no total: {out}"));
        line["total: ".len()..].split(' ').next().and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    total("192") - 2 * total("128") + total("64")
}

#[test]
fn report_flops_are_quadratic_in_n_for_softmax_attention_and_linear_for_linear_attention() {
    // The softmax baseline: one block of w = N positions. Its products alone give, per
    // layer, 2·(B·H·N)·N·(d + e) forward and 2·(B·H·N)·N·(3d + 2e) backward, with
    // d = e = D/H: 14·B·D·N². The weights region (scale, mask, softmax) and its
    // derivative add a few FLOPs per score, under 40 per head.
    let (layers, dim, heads, n) = (2i128, 32i128, 2i128, 64i128);
    let sets = ["--set", "vocab=64", "--set", "dim=32", "--set", "heads=2", "--set", "layers=2", "--set", "glu_dim=48"];
    let a = second_difference_of_flops("models/transformer.tn", &sets) / (2 * n * n);
    let products = layers * 14 * dim;
    assert!(a >= products && a <= products + layers * heads * 40, "N² coefficient {a}, products {products}");
    // Linear attention and DiagAttention's constant blocks: no N² term at all.
    for model in ["models/transnormer_t1.tn", "models/transnormer_t2.tn", "models/tnl.tn"] {
        let mut sets = TINY.to_vec();
        sets.push("--train");
        assert_eq!(second_difference_of_flops(model, &sets), 0, "{model}");
    }
}
