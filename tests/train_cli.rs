//! `tnc train` and `tnc eval` through the binary: a run killed with SIGKILL at a random
//! moment and resumed ends with parameters and optimizer state bit-identical to an
//! uninterrupted run; a truncated latest checkpoint is refused with a warning naming it
//! and the previous one is used; a non-finite loss stops the run naming the step; and
//! `tnc eval` reports on a run directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use tnc_train::checkpoint;

fn tnc() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tnc"));
    c.env("TNC_CACHE_DIR", scratch("cache"));
    c
}

fn scratch(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tnc-train-cli-{tag}-{}", std::process::id()))
}

fn fresh(tag: &str) -> PathBuf {
    let d = scratch(tag);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny T2-style training bundle, compiled once per test process.
fn bundle() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let out = fresh("bundle");
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
        let status = tnc()
            .arg("compile")
            .arg(&model)
            .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2"])
            .args(["--set", "glu_dim=24", "--set", "block=4", "--target", "native", "--train", "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        out
    })
    .clone()
}

/// `tnc train` on the tiny bundle with a constant learning rate (so runs of different
/// lengths take identical steps), two threads, a checkpoint every step.
fn train(out: &Path, steps: u64, extra: &[&str]) -> Command {
    let mut c = tnc();
    c.arg("train")
        .arg(bundle())
        .args(["--data", "mqar:pairs=2,vocab=16", "--batch", "4", "--seq", "16"])
        .args(if extra.contains(&"--lr") { &[][..] } else { &["--lr", "1e-2"][..] })
        .args(["--schedule", "constant", "--threads", "2", "--save-every", "1", "--keep-last", "0"])
        .args(["--steps", &steps.to_string()])
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run_ok(mut c: Command) -> (String, String) {
    let o = c.output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "tnc failed: {err}\n{out}");
    (out, err)
}

fn ckpt(run: &Path, step: u64) -> checkpoint::Checkpoint {
    checkpoint::load(&run.join("checkpoints").join(checkpoint::file_name(step))).unwrap()
}

/// Every tensor (parameters and AdamW moments) identical bit for bit.
fn assert_bit_identical(a: &checkpoint::Checkpoint, b: &checkpoint::Checkpoint) {
    assert_eq!(a.step, b.step);
    assert_eq!(a.data_position, b.data_position);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for ((na, sa, va), (nb, sb, vb)) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((na, sa), (nb, sb));
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "tensor `{na}` differs at step {}", a.step);
    }
}

/// A pseudo-random fraction in [0, 1) from the clock (the kill moment need not be
/// reproducible; it is printed).
fn random_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (nanos as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as f64 / u64::MAX as f64
}

#[test]
fn a_run_killed_at_a_random_moment_and_resumed_is_bit_identical_to_an_uninterrupted_one() {
    const STEPS: u64 = 30;
    let whole = fresh("whole");
    let started = Instant::now();
    run_ok(train(&whole, STEPS, &[]));
    let duration = started.elapsed();

    let killed = fresh("killed");
    let at = duration.mul_f64(0.1 + 0.8 * random_fraction());
    let mut child = train(&killed, STEPS, &[]).spawn().unwrap();
    std::thread::sleep(at);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let survived: Vec<_> = std::fs::read_dir(killed.join("checkpoints"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    eprintln!("killed after {at:?} of {duration:?}; {} files in its checkpoint directory", survived.len());

    let (_, err) = run_ok(train(&killed, STEPS, &["--resume"]));
    assert_bit_identical(&ckpt(&whole, STEPS), &ckpt(&killed, STEPS));
    if !survived.is_empty() {
        assert!(err.contains("resuming"), "the second run resumed: {err}");
    }
    // One metrics line per step, none twice.
    let records = tnc_train::metrics::read(&killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        records.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn a_truncated_latest_checkpoint_is_refused_and_the_previous_one_is_used() {
    let reference = fresh("reference");
    run_ok(train(&reference, 8, &[]));
    let run = fresh("truncated");
    run_ok(train(&run, 6, &[]));
    let latest = run.join("checkpoints").join(checkpoint::file_name(6));
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
    let (_, err) = run_ok(train(&run, 8, &["--resume"]));
    assert!(err.contains(&checkpoint::file_name(6)), "the warning names the bad checkpoint: {err}");
    assert!(err.contains("resuming") && err.contains("at step 5"), "resumed from step 5: {err}");
    assert_bit_identical(&ckpt(&reference, 8), &ckpt(&run, 8));
}

#[test]
fn training_without_resume_refuses_a_directory_with_checkpoints() {
    let run = fresh("twice");
    run_ok(train(&run, 2, &[]));
    let o = train(&run, 2, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoints() {
    let run = fresh("diverge");
    // A learning rate of 1e30 overflows the parameters on the first update.
    let o = train(&run, 5, &["--lr", "1e30", "--clip", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("step 2") && err.contains("non-finite"), "{err}");
    // Step 1's checkpoint was written and is still valid.
    assert_eq!(ckpt(&run, 1).step, 1);
}

#[test]
fn eval_reports_loss_and_accuracy_of_a_run() {
    let run = fresh("eval");
    run_ok(train(&run, 3, &[]));
    let mut c = tnc();
    c.arg("eval").arg(&run).args(["--threads", "2"]);
    let (out, _) = run_ok(c);
    assert!(out.contains("at step 3"), "{out}");
    assert!(out.contains("eval loss") && out.contains("perplexity") && out.contains("accuracy"), "{out}");
}

#[test]
fn ablate_trains_every_variant_and_writes_one_table_and_one_plot() {
    let out = fresh("ablate");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_all_norm.tn");
    let mut c = tnc();
    c.arg("ablate")
        .arg(&model)
        .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2", "--set", "glu_dim=24"])
        .args(["--variant", "block2:block=2"])
        .arg("--variant-file")
        .arg(&other)
        .args(["--data", "mqar:pairs=2,vocab=16", "--steps", "3", "--batch", "4", "--seq", "16", "--threads", "2"])
        .args(["--accumulate", "2", "--out"])
        .arg(&out);
    let (stdout, _) = run_ok(c);
    for row in ["| mqar_t2 |", "| block2 |", "| mqar_all_norm |"] {
        assert!(stdout.contains(row), "the table has a row `{row}`:\n{stdout}");
    }
    assert!(stdout.contains("eval accuracy"), "{stdout}");
    let table = std::fs::read_to_string(out.join("ablation.md")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| variant")).count(), 3);
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"));
    for name in ["mqar_t2", "block2", "mqar_all_norm"] {
        assert!(svg.contains(name), "the plot's legend names {name}");
        // Each variant trained its 3 steps in its own run directory.
        let records = tnc_train::metrics::read(&out.join(name).join("metrics.jsonl")).unwrap();
        assert_eq!(records.iter().filter(|r| r.get("loss").is_some()).count(), 3, "{name}");
    }
}
