//! `tnc train` and `tnc eval` through the binary: a run killed with SIGKILL at a random
//! moment (or twenty times, mid-checkpoint-write too) and resumed ends with parameters and optimizer state bit-identical to an
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

/// A tiny T2-style training bundle for the host CPU, compiled once per test process.
fn bundle() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| compile_bundle("native")).clone()
}

/// The same model's training bundle for sm80, which the emulated GPU runs.
fn gpu_bundle() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| compile_bundle("sm80")).clone()
}

fn compile_bundle(target: &str) -> PathBuf {
    {
        let out = fresh(&format!("bundle-{target}"));
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
        let status = tnc()
            .arg("compile")
            .arg(&model)
            .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2"])
            .args(["--set", "glu_dim=24", "--set", "block=4", "--target", target, "--train", "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        out
    }
}

/// `tnc train` on the tiny bundle with a constant learning rate (so runs of different
/// lengths take identical steps), two threads, a checkpoint every step.
fn train(out: &Path, steps: u64, extra: &[&str]) -> Command {
    train_bundle(&bundle(), out, steps, extra)
}

/// [`train`] with another bundle.
fn train_bundle(bundle: &Path, out: &Path, steps: u64, extra: &[&str]) -> Command {
    let mut c = tnc();
    c.arg("train")
        .arg(bundle)
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
    killed_and_resumed(&bundle(), &[], "cpu");
}

/// The same on the emulated GPU: GPU schedules reduce in a fixed order (no atomics), so
/// a resumed run is bit-identical there too.
#[test]
fn on_the_emulated_gpu_a_killed_run_resumes_bit_identically() {
    killed_and_resumed(&gpu_bundle(), &["--device", "emulated"], "emulated");
}

fn killed_and_resumed(bundle: &Path, device: &[&str], tag: &str) {
    const STEPS: u64 = 30;
    let whole = fresh(&format!("whole-{tag}"));
    let started = Instant::now();
    run_ok(train_bundle(bundle, &whole, STEPS, device));
    let duration = started.elapsed();

    let killed = fresh(&format!("killed-{tag}"));
    let at = duration.mul_f64(0.1 + 0.8 * random_fraction());
    let mut child = train_bundle(bundle, &killed, STEPS, device).spawn().unwrap();
    std::thread::sleep(at);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Complete checkpoints only: a kill mid-write leaves a `.tmp` file, which a resumed
    // run discards (and then starts from scratch).
    let survived: Vec<_> = std::fs::read_dir(killed.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().ends_with(".safetensors"))
                .collect()
        })
        .unwrap_or_default();
    eprintln!("killed after {at:?} of {duration:?}; {} files in its checkpoint directory", survived.len());

    let resume: Vec<&str> = device.iter().copied().chain(["--resume"]).collect();
    let (_, err) = run_ok(train_bundle(bundle, &killed, STEPS, &resume));
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

/// Twenty SIGKILLs in one run: each life is killed either at a random moment (its start
/// and the bundle copy included) or the moment a checkpoint's temporary file appears
/// (mid-write), and resumed by the next. After every kill each checkpoint on disk still
/// loads (checksum verified); the last life finishes, bit-identical to an uninterrupted
/// run, with one metrics line per step.
#[test]
fn a_run_killed_twenty_times_ends_bit_identical_to_an_uninterrupted_one() {
    const STEPS: u64 = 200;
    const KILLS: usize = 20;
    let whole = fresh("whole-20");
    let started = Instant::now();
    run_ok(train(&whole, STEPS, &[]));
    // Even lives last a random part of 1/40 of the whole run; odd ones are killed while
    // writing their k-th checkpoint, k in 1..=5: together at most half the run, so the
    // twenty cannot finish it even on a host faster than when the whole run was timed.
    let life = started.elapsed() / 40;

    let killed = fresh("killed-20");
    let checkpoints = killed.join("checkpoints");
    let (mut landed, mut mid_write) = (0, 0);
    for i in 0..KILLS {
        let extra: &[&str] = if i == 0 { &[] } else { &["--resume"] };
        let mut child = train(&killed, STEPS, extra).spawn().unwrap();
        if i % 2 == 0 {
            std::thread::sleep(life.mul_f64(random_fraction()));
        } else {
            let k = 1 + (random_fraction() * 5.0) as usize;
            let mut seen = std::collections::HashSet::new();
            while seen.len() < k && child.try_wait().unwrap().is_none() {
                let writing = std::fs::read_dir(&checkpoints).into_iter().flatten().filter_map(|e| e.ok());
                seen.extend(writing.map(|e| e.file_name()).filter(|f| f.to_string_lossy().ends_with(".tmp")));
            }
        }
        if child.try_wait().unwrap().is_none() {
            landed += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let files: Vec<String> = std::fs::read_dir(&checkpoints)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        mid_write += usize::from(files.iter().any(|f| f.ends_with(".tmp")));
        for f in files.iter().filter(|f| f.ends_with(".safetensors")) {
            checkpoint::load(&checkpoints.join(f)).unwrap_or_else(|e| panic!("kill {i} damaged {f}: {e}"));
        }
    }
    eprintln!("{landed} of {KILLS} kills landed on a running tnc, {mid_write} left a checkpoint half written");
    assert_eq!(landed, KILLS, "every kill interrupted the run");
    let (_, err) = run_ok(train(&killed, STEPS, &["--resume"]));
    assert_bit_identical(&ckpt(&whole, STEPS), &ckpt(&killed, STEPS));
    assert!(err.contains("resuming"), "the last life resumed: {err}");
    eprintln!("{}", err.lines().find(|l| l.contains("resuming")).unwrap_or_default());
    let records = tnc_train::metrics::read(&killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        records.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

/// A checkpoint written on the CPU resumes on the emulated GPU and one written there
/// resumes on the CPU: the bundles differ (their targets), the model is the same
/// (`model_sha256`), so the run continues with a warning that it is not bit-identical.
/// Either way the resumed run ends within 1e-3 of the loss of an uninterrupted CPU run
/// (measured: both schedules agree to 1e-6 over these 20 steps).
/// The same model trained from its .tn file with kernels written by Cranelift and by
/// LLVM: both are bit-identical to the kernel executor, so the runs are bit-identical to
/// each other; each back end's bundle is cached apart.
#[test]
fn training_with_cranelift_kernels_is_bit_identical_to_llvm() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let mut runs = Vec::new();
    for backend in ["llvm", "cranelift"] {
        let run = fresh(&format!("backend-{backend}"));
        let sets = ["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2"];
        let mut c = train_bundle(&model, &run, 8, &["--backend", backend]);
        c.args(sets).args(["--set", "glu_dim=24", "--set", "block=4"]);
        let (_, err) = run_ok(c);
        let with = err.contains("with cranelift");
        assert_eq!(with, backend == "cranelift", "{backend}: {err}");
        assert!(err.contains("compiling"), "{backend}: each back end's bundle is its own: {err}");
        runs.push(run);
    }
    assert_bit_identical(&ckpt(&runs[0], 8), &ckpt(&runs[1], 8));
}

#[test]
fn a_checkpoint_resumes_on_the_other_device() {
    let whole = fresh("whole-cpu-20");
    run_ok(train(&whole, 20, &[]));
    let last_loss = |run: &Path| {
        let records = tnc_train::metrics::read(&run.join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> =
            records.iter().filter(|r| r.get("loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "one record per step");
        records.iter().rev().find_map(|r| r.get("loss")?.as_f64()).unwrap()
    };
    let want = last_loss(&whole);
    let emulated = ["--device", "emulated"];
    for (first, then, tag) in [
        ((bundle(), &[][..]), (gpu_bundle(), &emulated[..]), "cpu-to-gpu"),
        ((gpu_bundle(), &emulated[..]), (bundle(), &[][..]), "gpu-to-cpu"),
    ] {
        let run = fresh(tag);
        run_ok(train_bundle(&first.0, &run, 10, first.1));
        // Extending the run from 10 to 20 steps (a constant schedule: the same steps).
        let resume: Vec<&str> = then.1.iter().copied().chain(["--resume", "--allow-changed", "steps"]).collect();
        let (_, err) = run_ok(train_bundle(&then.0, &run, 20, &resume));
        assert!(
            err.contains("written by the same model compiled for") && err.contains("not bit-identically"),
            "{tag}: {err}"
        );
        assert!(err.contains("resuming"), "{tag}: {err}");
        let got = last_loss(&run);
        assert!((got - want).abs() <= 1e-3, "{tag}: final loss {got}, uninterrupted CPU run {want}");
        assert_eq!(ckpt(&run, 20).step, 20);
        // `tnc eval` runs where the run's last bundle runs, or where `--device` says.
        let mut eval = tnc();
        eval.arg("eval").arg(&run).args(then.1);
        let (out, _) = run_ok(eval);
        assert!(out.contains("at step 20") && out.contains("accuracy"), "{tag}: {out}");
    }
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
    let (_, err) = run_ok(train(&run, 8, &["--resume", "--allow-changed", "steps"]));
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

/// Resuming a finished run (or one past a smaller `--steps`) trains nothing, says so, and
/// reports the run's own speed from its metrics (it said "0 tokens/s").
#[test]
fn resuming_a_finished_run_trains_nothing_and_keeps_its_speed() {
    let run = fresh("finished");
    run_ok(train(&run, 3, &[]));
    for (steps, extra) in [(3, &[][..]), (2, &["--allow-changed", "steps"][..])] {
        let args: Vec<&str> = ["--resume"].into_iter().chain(extra.iter().copied()).collect();
        let (out, err) = run_ok(train(&run, steps, &args));
        assert!(err.contains(&format!("the run is at step 3 of --steps {steps}: nothing left to train")), "{err}");
        assert!(out.contains("for 3 steps"), "{out}");
        let speed = out.split(" tokens/s (median)").next().and_then(|s| s.rsplit(' ').next()).unwrap_or_default();
        assert!(speed.parse::<f64>().is_ok_and(|t| t > 0.0), "speed `{speed}` in {out}");
    }
}

/// Evaluating on data with more tokens than the model's vocabulary is refused up front,
/// as training is (it reported 10.4 bits per byte of bytes a vocab-64 model cannot read).
#[test]
fn eval_refuses_data_beyond_the_vocabulary() {
    let run = fresh("eval-vocab");
    run_ok(train(&run, 2, &[]));
    let text = scratch("eval-vocab.txt");
    std::fs::write(&text, "bytes up to 255 do not fit a vocabulary of 16\n".repeat(20)).unwrap();
    let o = tnc().arg("eval").arg(&run).arg("--data").arg(format!("text:{}", text.display())).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the model's vocabulary (16) is smaller than the data's (256"), "{err}");
    assert!(err.contains("use `--set vocab=256`"), "{err}");
}

/// A classifier (a model with an input `labels`) needs labelled data and labelled data a
/// classifier: either mismatch is refused before training, naming the fix (it used to
/// fail later with "input 'labels': missing").
#[test]
fn labelled_data_and_classifiers_go_together() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cases = [
        ("models/tasks/listops_encoder.tn", "copy:vocab=16", "has no labels: use labelled data, `--data listops`"),
        (
            "models/tasks/mqar_t2.tn",
            "listops:depth=2",
            "is labelled data (a class per sequence), but the model has no input `labels`",
        ),
    ];
    for (i, (model, data, want)) in cases.into_iter().enumerate() {
        let out = fresh(&format!("labels-{i}"));
        let o = tnc()
            .arg("train")
            .arg(repo.join(model))
            .args(["--data", data, "--steps", "1", "--set", "vocab=16", "--set", "dim=16", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{model}: {err}");
        assert!(err.contains(want), "{model}: {err}");
    }
    // A label past the model's classes is refused before training, not at the first batch
    // that holds it (it once trained and checkpointed 60 steps first).
    let dir = fresh("labels-past-classes");
    std::fs::create_dir_all(&dir).unwrap();
    let rows: String =
        (0..40).map(|i| format!("{{\"tokens\": [1, 2, {}], \"label\": {}}}\n", 3 + i % 5, i % 8)).collect();
    std::fs::write(dir.join("rows.jsonl"), rows).unwrap();
    let o = tnc()
        .arg("train")
        .arg(repo.join("models/tasks/listops_encoder.tn"))
        .args(["--set", "classes=4", "--set", "vocab=16", "--set", "dim=16", "--steps", "1", "--data"])
        .arg(format!("jsonl:{}", dir.join("rows.jsonl").display()))
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("has labels up to 7") && err.contains("--set classes=8"), "{err}");
    assert!(!dir.join("run").exists(), "nothing trained");
}

/// A run directory holds its own bundle (`RUN/bundle`, named relatively in `run.json` and
/// the checkpoints): moved elsewhere, it still evaluates and resumes, from that copy.
#[test]
fn a_moved_run_directory_evaluates_and_resumes_from_its_own_bundle() {
    let run = fresh("self-contained");
    run_ok(train(&run, 3, &[]));
    assert!(run.join("bundle/manifest.json").is_file());
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["bundle"], "bundle");
    assert_eq!(ckpt(&run, 3).meta["bundle"], "bundle");
    let moved = fresh("self-contained-moved");
    std::fs::rename(&run, &moved).unwrap();
    let eval = || {
        let mut c = tnc();
        c.arg("eval").arg(&moved).args(["--threads", "2"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.output().unwrap()
    };
    let o = eval();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("at step 3"));
    // It is the run's copy that eval uses.
    std::fs::rename(moved.join("bundle"), moved.join("elsewhere")).unwrap();
    let o = eval();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("bundle"));
    std::fs::rename(moved.join("elsewhere"), moved.join("bundle")).unwrap();
    run_ok(train_bundle(&moved.join("bundle"), &moved, 5, &["--resume", "--allow-changed", "steps"]));
    assert_eq!(ckpt(&moved, 5).step, 5);
}

#[test]
fn ablate_trains_every_variant_and_writes_one_table_and_one_plot() {
    let out = fresh("ablate");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_all_norm.tn");
    let ablate = |extra: &[&str]| {
        let mut c = tnc();
        c.arg("ablate")
            .arg(&model)
            .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2"])
            .args(["--set", "glu_dim=24", "--variant", "block2:block=2"])
            .arg("--variant-file")
            .arg(&other)
            .args(["--data", "mqar:pairs=2,vocab=16", "--steps", "3", "--batch", "4", "--seq", "16", "--threads", "2"])
            .args(["--accumulate", "2", "--out"])
            .arg(&out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // A bad variant fails the command before any variant trains.
    let o = ablate(&["--variant", "bad:nosuch=1"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("nosuch") && err.contains("in variant `bad`; no variant was trained"),
        "{err}"
    );
    assert!(!out.join("mqar_t2").exists(), "nothing trained");
    let (stdout, _) = run_ok(ablate(&[]));
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
    // `--resume` on the finished ablation retrains nothing and writes the same rows.
    let (again, _) = run_ok(ablate(&["--resume"]));
    for row in ["| mqar_t2 |", "| block2 |", "| mqar_all_norm |"] {
        assert!(again.contains(row), "{again}");
    }
    for name in ["mqar_t2", "block2", "mqar_all_norm"] {
        let records = tnc_train::metrics::read(&out.join(name).join("metrics.jsonl")).unwrap();
        assert_eq!(records.iter().filter(|r| r.get("loss").is_some()).count(), 3, "{name}: not retrained");
    }
}

/// A variant's run is `--out/NAME`, so a name that is not one plain directory name is bad
/// usage, refused before anything trains or is written (`../x` once replaced the files of
/// a directory beside `--out`).
#[test]
fn ablate_refuses_variant_names_that_are_not_directory_names() {
    let dir = fresh("ablate-names");
    let beside = dir.join("v");
    std::fs::create_dir_all(&beside).unwrap();
    std::fs::write(beside.join("run.json"), "mine").unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    for name in ["../v", "", ".", "a/b", "loss.svg"] {
        let o = tnc()
            .arg("ablate")
            .arg(&model)
            .args(["--set", "vocab=16", "--set", "dim=16", "--set", "heads=2", "--set", "layers=1"])
            .args(["--no-base", "--variant", &format!("{name}:block=2")])
            .args(["--data", "mqar:pairs=2,vocab=16", "--steps", "1", "--batch", "2", "--seq", "16", "--out"])
            .arg(dir.join("out"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "`{name}`: {err}");
        assert!(err.contains(&format!("`{name}` cannot name a variant")), "`{name}`: {err}");
    }
    assert_eq!(std::fs::read_to_string(beside.join("run.json")).unwrap(), "mine");
    assert!(!dir.join("out").exists(), "nothing was written");
}

/// `tnc train --target sm80` trains on CUDA; without a driver it says so in one line
/// before compiling anything, and points at the emulated GPU.
#[test]
fn gpu_training_without_a_driver_fails_before_compiling() {
    if tnc_runtime::cuda::driver_present() {
        eprintln!("skipped: a CUDA driver is present");
        return;
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let o = tnc()
        .arg("train")
        .arg(&model)
        .args(["--target", "sm80", "--steps", "1", "--out"])
        .arg(fresh("nodriver"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("compiling"), "it compiled first: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains("no CUDA driver found") && lines[0].contains("--device emulated"), "{err}");
    // A CPU target with a GPU device, or the reverse, is bad usage.
    let o = tnc()
        .arg("train")
        .arg(&model)
        .args(["--target", "native", "--device", "emulated", "--out"])
        .arg(fresh("usage"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Ctrl-C (SIGINT) during a run: it finishes the step it is in, writes a checkpoint of
/// that step, says where, and exits with status 130; that checkpoint is the latest and
/// whole. Without a terminal, progress is a plain line every 5% of the steps.
#[test]
fn an_interrupted_run_checkpoints_the_step_it_finished_and_exits_130() {
    const STEPS: u64 = 2000;
    let run = fresh("interrupted");
    let mut child = train(&run, STEPS, &[]).spawn().unwrap();
    let metrics = run.join("metrics.jsonl");
    let started = Instant::now();
    // Wait for a few steps (the run would take far longer than this test waits).
    while tnc_train::metrics::read(&metrics).map_or(0, |r| r.len()) < 3 {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the run ended by itself ({status}): {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(started.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let step: u64 = err
        .split("interrupted after step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step named: {err}"));
    assert!(step >= 3 && step < STEPS, "{err}");
    assert!(err.contains(&checkpoint::file_name(step)) && err.contains("--resume"), "{err}");
    // The latest checkpoint is that step's, and whole.
    assert_eq!(ckpt(&run, step).step, step);
    let (path, latest, _) = checkpoint::latest_valid(&run.join("checkpoints")).unwrap().unwrap();
    assert_eq!(latest.step, step, "{}", path.display());
    // One metrics line per finished step.
    let losses = tnc_train::metrics::read(&metrics).unwrap().iter().filter(|r| r.get("loss").is_some()).count();
    assert_eq!(losses as u64, step);
    if step >= STEPS / 20 {
        assert!(err.contains(&format!("step {}/{STEPS}: loss", STEPS / 20)), "progress lines: {err}");
    }
}

/// `--resume` with settings that would change what the run computes is refused, naming
/// each difference and the flag that allows it (a changed `--data` too: the trainer's unit
/// tests); `--allow-changed` lets them through with a
/// warning; an unknown name there is an error listing the valid ones.
#[test]
fn resuming_with_other_settings_is_refused_unless_allowed() {
    let run = fresh("changed");
    run_ok(train(&run, 3, &[]));
    let o = train(&run, 5, &["--resume", "--lr", "3e-2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("--steps 3 (now 5)") && err.contains("--lr 0.01 (now 0.03)"), "{err}");
    assert!(err.contains("--allow-changed steps,lr"), "{err}");
    let (_, err) = run_ok(train(&run, 5, &["--resume", "--allow-changed", "steps"]));
    assert!(err.contains("resuming with --steps 5 (the run had 3)"), "{err}");
    assert_eq!(ckpt(&run, 5).step, 5);
    let o = train(&run, 5, &["--resume", "--allow-changed", "threads"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`threads` is not a setting") && err.contains("weight-decay"), "{err}");
}

/// Without a terminal a run prints plain progress lines; `--quiet` leaves them out.
#[test]
fn progress_lines_unless_quiet() {
    let (_, err) = run_ok(train(&fresh("progress"), 3, &[]));
    assert!(err.contains("step 3/3: loss"), "{err}");
    let (_, err) = run_ok(train(&fresh("quiet"), 3, &["--quiet"]));
    assert!(!err.contains("step 3/3"), "{err}");
}

/// A model whose training state no machine holds (T1 with 2^31 vocabulary rows: about
/// 2^40 parameters) is refused before it compiles (it once compiled for over ten
/// minutes), with the figures, and leaves nothing in the cache or the run directory.
#[test]
fn a_model_too_large_for_this_machine_is_refused_before_compiling() {
    let cache = fresh("cache-too-large");
    let out = fresh("too-large");
    let started = Instant::now();
    let res = Command::new(env!("CARGO_BIN_EXE_tnc"))
        .env("TNC_CACHE_DIR", &cache)
        .args(["train", "models/transnormer_t1.tn", "--set", "vocab=2**31", "--data", "mqar", "--steps", "2"])
        .args(["--batch", "1", "--seq", "64", "--out"])
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("tnc runs");
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TiB for its training state") && stderr.contains("available"), "{stderr}");
    assert!(stderr.contains("--set"), "the hint says how to shrink it: {stderr}");
    assert!(!stderr.contains("compiling"), "{stderr}");
    assert!(!out.exists(), "no run directory is created");
    let cached = std::fs::read_dir(cache.join("bundles")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cached, 0, "nothing was compiled into the cache");
    eprintln!("refused in {secs:.2} s");
}

/// Subword text data from the command line: `tnc tokenizer train` writes a byte-level
/// BPE, `tnc train --tokenizer` trains on the file's subword tokens (tokenized once, the
/// cache next to the file), `tnc eval` reports perplexity per token and bits per byte with
/// the run's tokenizer; a vocabulary too small for the tokenizer, and `--tokenizer` on
/// synthetic data, are refused.
#[test]
fn text_data_through_a_trained_tokenizer() {
    let dir = fresh("tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/language.md"), &corpus).unwrap();
    let tok = dir.join("tokenizer.json");
    let mut c = tnc();
    c.args(["tokenizer", "train"]).arg(&corpus).args(["--vocab", "512", "-o"]).arg(&tok);
    let (out, _) = run_ok(c);
    assert!(out.contains("512 tokens"), "{out}");
    // The tokenizer is never written over its own text, another file, or with a vocabulary
    // too large to train; the files stay as they were.
    let text = std::fs::read(&corpus).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    for (o, vocab, why) in [
        (&corpus, "512", "is one of the text files"),
        (&notes, "512", "exists and is not a tokenizer"),
        (&tok, "18446744073709551615", "too large"),
    ] {
        let mut c = tnc();
        let r = c.args(["tokenizer", "train"]).arg(&corpus).args(["--vocab", vocab, "-o"]).arg(o).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.code() == Some(1) && err.contains(why), "{why}: {err}");
    }
    assert_eq!(std::fs::read(&corpus).unwrap(), text);
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/transnormer_t1.tn");
    let train = |vocab: &str, data: &str, run: &Path| {
        let mut c = tnc();
        c.arg("train").arg(&model).args(["--set", &format!("vocab={vocab}"), "--set", "dim=32", "--set", "heads=2"]);
        c.args(["--set", "layers=1", "--set", "glu_dim=64", "--data", data, "--tokenizer"]).arg(&tok);
        c.args(["--batch", "4", "--seq", "32", "--steps", "20", "--lr", "3e-3", "--quiet", "--out"]).arg(run);
        c
    };
    let data = format!("text:{}", corpus.display());
    let run = dir.join("run");
    let (out, _) = run_ok(train("512", &data, &run));
    assert!(out.contains("bits per byte") && out.contains("bytes per token"), "{out}");
    let cached: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("corpus.txt.tok-") && n.ends_with(".tokens"))
        .collect();
    assert_eq!(cached.len(), 1, "one cached encoding: {cached:?}");
    let mut eval = tnc();
    eval.arg("eval").arg(&run);
    let (out, _) = run_ok(eval);
    assert!(out.contains("?tokenizer=") && out.contains("perplexity") && out.contains("per token"), "{out}");
    let per_byte: f64 = out.split("bits per byte ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let per_token: f64 =
        out.split("bits per token ").nth(1).unwrap().split([',', ' ']).next().unwrap().parse().unwrap();
    // A subword token covers more than one byte of this text.
    assert!(per_byte > 0.0 && per_byte < per_token / 1.5, "{per_byte} bits per byte, {per_token} per token");

    let o = train("256", &data, &dir.join("small")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("vocabulary (256) is smaller") && err.contains("vocab=512"), "{err}");
    let o = train("512", "copy", &dir.join("copy")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("applies to text data"), "{err}");
}

/// A run whose activations at B, N cannot fit this machine is refused before its run
/// directory is made: nothing is left behind (the model itself is small, so it compiles).
#[test]
fn a_run_too_large_at_its_sizes_leaves_no_run_directory() {
    let run = fresh("too-large-activations");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let o = tnc()
        .arg("train")
        .arg(&model)
        .args(["--set", "dim=32", "--set", "heads=2", "--set", "layers=1", "--set", "glu_dim=64"])
        .args(["--batch", "4096", "--seq", "65536", "--steps", "1", "--quiet", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("its activations at B = 4096, N = 65536 need"), "{err}");
    assert!(!run.exists(), "the refused run left {}", run.display());
}
