//! The `tnc` binary: exit status 0 on success, 1 for an error in the model, 2 for bad usage.

mod common;
use common::repo;
use std::process::Command;

fn tnc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tnc")).args(args).current_dir(repo()).output().expect("tnc runs");
    (
        out.status.code().expect("exited normally, not by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_a_summary() {
    let (code, out, err) = tnc(&["check", "models/transnormer_t1.tn"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("parameters: 155,988,156 trainable"), "{out}");
    assert!(out.contains("tokens: i32[B, N]"), "{out}");
    assert!(out.contains("loss: f32[]"), "{out}");
    assert!(out.contains("layers.5"), "{out}");
    // 155,988,156 × 20 bytes (parameter, gradient, gradient sum, two moments) + 4 per buffer.
    assert!(out.contains("memory: 595.05 MiB of parameters; training state 2.91 GiB"), "{out}");
    assert!(out.contains("training step at B = 1, N = 2048 (--batch, --seq):"), "{out}");
}

/// `tnc check --batch --seq` prints the activation memory of a training step from the
/// memory plan, the figure `tnc compile --report` gives as a formula: for this tiny MQAR
/// model 684·B·N + 1056·B·⌈N/4⌉ + 660 bytes, so 30,996 bytes (30.27 KiB) at B = 2, N = 16.
#[test]
fn check_estimates_activations_at_the_requested_sizes() {
    let tiny = ["--set", "vocab=16", "--set", "dim=8", "--set", "heads=2", "--set", "layers=1"];
    let mut args = vec!["check", "models/tasks/mqar_t2.tn", "--set", "glu_dim=12", "--set", "block=4"];
    args.extend(tiny);
    let at = |b: &str, n: &str| {
        let mut a = args.clone();
        a.extend(["--batch", b, "--seq", n]);
        let (code, out, err) = tnc(&a);
        assert_eq!(code, 0, "{err}");
        out
    };
    let out = at("2", "16");
    assert!(out.contains("training step at B = 2, N = 16 (--batch, --seq): 30.27 KiB of activations"), "{out}");
    // 684·2048 + 1056·512 + 660 = 1,942,164 bytes.
    let out = at("1", "2048");
    assert!(out.contains("training step at B = 1, N = 2048 (--batch, --seq): 1.85 MiB of activations"), "{out}");
    let (code, _, err) = tnc(&["check", "models/tasks/mqar_t2.tn", "--seq", "0"]);
    assert_eq!(code, 2, "N = 0 is a usage error: {err}");
}

/// A model whose training state cannot fit this machine: `tnc check` warns with the
/// figure, and `tnc train` refuses before allocating anything (no run directory appears).
#[test]
fn a_model_too_large_for_the_machine_is_refused_up_front() {
    let (code, out, _) = tnc(&["check", "models/transnormer_t1.tn", "--set", "vocab=2**31"]);
    assert_eq!(code, 0);
    assert!(out.contains("warning: training this model at B = 1, N = 2048 needs more than the"), "{out}");
    let run = std::env::temp_dir().join(format!("tnc-cli-too-large-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let cache = std::env::temp_dir().join(format!("tnc-cli-too-large-cache-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_tnc"))
        .args(["train", "models/tasks/mqar_t2.tn", "--data", "mqar", "--set", "dim=32768", "--set", "glu_dim=64"])
        .args(["--steps", "2", "--batch", "2", "--seq", "16", "--out"])
        .arg(&run)
        .env("TNC_CACHE_DIR", &cache)
        .current_dir(repo())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // T2 at dim 32768 holds 64 GiB of parameters, 320 GiB of training state: refused
    // before compiling (`bundle_cache::fits_in_host_memory`) on a machine with less.
    let available = tnc_runtime::host_memory::available_bytes().expect("Linux reports it");
    if available < 320 << 30 {
        assert!(err.contains("for its training state") && err.contains("available"), "{err}");
        assert!(!err.contains("compiling"), "{err}");
    } else {
        assert!(err.contains("the model does not fit on cpu") && err.contains("GiB are free"), "{err}");
    }
    assert!(!run.exists(), "nothing was written");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn model_errors_exit_with_1() {
    let (code, _, err) = tnc(&["check", "tests/malformed/unknown_name_typo.tn"]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean `srms_norm`?"), "{err}");
    assert!(err.contains("unknown_name_typo.tn:5:7"), "{err}");
}

#[test]
fn usage_errors_exit_with_2() {
    assert_eq!(tnc(&["check"]).0, 2, "missing file argument");
    assert_eq!(tnc(&["frobnicate"]).0, 2, "unknown command");
    assert_eq!(tnc(&["check", "models/transnormer_t1.tn", "--set", "layres=2"]).0, 2, "unknown hyper-parameter");
    assert_eq!(tnc(&["check", "models/transnormer_t1.tn", "--set", "dim"]).0, 2, "malformed --set");
    let (code, _, err) = tnc(&["ir", "models/transnormer_t1.tn", "--after", "optimise"]);
    assert_eq!(code, 2);
    assert!(err.contains("the stages are, in order: elaborate"), "{err}");
}

#[test]
fn missing_file_is_an_error_not_a_panic() {
    let (code, _, err) = tnc(&["check", "no/such/model.tn"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read `no/such/model.tn`"), "{err}");
}

#[test]
fn ir_prints_text_and_dot() {
    let tiny = ["--set", "vocab=32", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2", "--set", "block=4"];
    let mut args = vec!["ir", "models/transnormer_t1.tn"];
    args.extend(tiny);
    let (code, text, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with("graph transnormer_t1 {"), "{text}");
    assert!(text.contains("output loss = %"), "{text}");
    args.push("--dot");
    let (code, dot, _) = tnc(&args);
    assert_eq!(code, 0);
    assert!(dot.starts_with("digraph \"transnormer_t1\" {"), "{dot}");
    assert!(dot.contains("->"), "{dot}");
}

#[test]
fn help_explains_set() {
    let (code, out, _) = tnc(&["check", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--set <NAME=VALUE>"), "{out}");
}

/// `tnc ir --after STAGE --target T` prints the program after any stage of T's pipeline:
/// library GEMM nodes and chunk launches with launch arguments on CPUs; on GPUs the
/// attention's thread blocks after `schedule`, the GEMMs tiled after `tile_gemm`. The
/// stage list is the target's (an unknown name lists them; a training stage without
/// `--train` says so); a bad target is a usage error.
#[test]
fn ir_shows_every_stage_of_a_target() {
    let tiny = ["--set", "vocab=32", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2", "--set", "block=4"];
    let after = |stage: &str, target: &str, more: &[&str]| {
        let mut args = vec!["ir", "models/transnormer_t1.tn", "--after", stage, "--target", target];
        args.extend(tiny);
        args.extend(more);
        tnc(&args)
    };
    let (code, cpu, err) = after("schedule", "native", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(cpu.contains("library gemm C = A·B") && cpu.contains("with launch arguments [0]"), "{cpu}");
    let (code, gpu, err) = after("schedule", "sm80", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(gpu.contains("parallel block") && gpu.contains("library gemm"), "{gpu}");
    let (code, tiled, err) = after("tile_gemm", "sm80", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(tiled.contains("parallel block") && !tiled.contains("library gemm"), "{tiled}");
    let (code, plan, err) = after("plan_memory", "native", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(plan.starts_with("peak ") && plan.contains("activations"), "{plan}");
    let (code, _, err) = after("interchange", "sm80", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("split_reductions, tile_gemm, coalesce_rows"), "the GPU's stages: {err}");
    let (code, _, err) = after("optimizer", "native", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("add `--train`"), "{err}");
    let (code, opt, err) = after("optimizer", "native", &["--train"]);
    assert_eq!(code, 0, "{err}");
    assert!(opt.contains("(Step)"), "the optimizer's launches: {opt}");
    let (code, _, err) = after("schedule", "sm75", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("sm80"), "{err}");
}

/// Output piped into a reader that stops early (`tnc ir … | head -1`): tnc ends quietly,
/// killed by SIGPIPE as other Unix tools are, instead of panicking on the failed write.
#[test]
fn a_closed_pipe_ends_tnc_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tnc"))
        .args(["ir", "models/transnormer_t1.tn", "--after", "schedule"])
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tnc runs");
    // Read the first bytes, then close the pipe (the schedule's text is megabytes long).
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_eq!(status.signal(), Some(13), "ended by SIGPIPE: {status:?}\n{err}");
}

/// A directory without `manifest.json` is refused as not a bundle (it said "Is a
/// directory" when taken for a model file), by every command that takes a bundle.
#[test]
fn a_directory_without_a_manifest_is_not_a_bundle() {
    let dir = std::env::temp_dir().join(format!("tnc-cli-not-a-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kernels.so"), b"").unwrap();
    let d = dir.to_str().unwrap();
    for args in [
        vec!["verify", d, "--source", "models/tasks/mqar_t2.tn"],
        vec!["train", d, "--data", "mqar", "--steps", "1", "--out", "/nonexistent/tnc-run"],
    ] {
        let (code, _, err) = tnc(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(&format!("{d} is not a bundle: it has no manifest.json")), "{args:?}: {err}");
        assert!(!err.contains("Is a directory"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
