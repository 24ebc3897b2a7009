//! Learning, asserted: small models trained by `tnc train` (compiled bundles, AdamW
//! kernels) solve the synthetic tasks. Thresholds were calibrated first (see each test)
//! and leave a wide margin above chance and below what the calibration runs reached.

use std::path::Path;
use std::process::Command;

/// Trains `model` with `sets` on `data`, then returns the final evaluation's accuracy on
/// the task's answers (from `metrics.jsonl`).
fn final_accuracy(tag: &str, model: &str, sets: &[&str], data: &str, steps: u64, seq: u64) -> f64 {
    final_accuracy_in(tag, model, sets, data, (steps, seq), "f32")
}

/// [`final_accuracy`] with `--precision`.
fn final_accuracy_in(
    tag: &str,
    model: &str,
    sets: &[&str],
    data: &str,
    (steps, seq): (u64, u64),
    precision: &str,
) -> f64 {
    let out = std::env::temp_dir().join(format!("tnc-learning-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new(env!("CARGO_BIN_EXE_tnc"));
    c.env("TNC_CACHE_DIR", out.with_extension("cache"))
        .arg("train")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(model))
        .args(["--data", data, "--steps", &steps.to_string(), "--seq", &seq.to_string()])
        .args(["--batch", "32", "--lr", "3e-3", "--warmup", "10", "--threads", "2", "--seed", "0"])
        .args(["--precision", precision])
        .arg("--out")
        .arg(&out);
    for s in sets {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = tnc_train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    let last = records.iter().rev().find_map(|r| r.get("eval_accuracy")?.as_f64()).expect("an evaluation");
    eprintln!("{tag}: accuracy {:.1}% after {steps} steps\n{}", 100.0 * last, String::from_utf8_lossy(&o.stdout));
    last
}

const SMALL: [&str; 5] = ["vocab=16", "dim=32", "heads=2", "layers=2", "glu_dim=64"];

/// Copy (7 tokens after a separator, vocabulary 16) with one softmax block over the
/// whole sequence. Calibration: 22% after 75 steps, 94% after 125, 100% after 200.
#[test]
fn a_tiny_model_learns_to_copy() {
    let sets: Vec<&str> = SMALL.iter().copied().chain(["block=16"]).collect();
    let acc = final_accuracy("copy", "models/tasks/mqar_t2.tn", &sets, "copy:vocab=16", 200, 16);
    assert!(acc >= 0.9, "copy accuracy {acc} (chance 1/14)");
}

/// MQAR with 2 pairs (keys 1..=7, values 8..=15, chance 1/8) at N = 32 = 4 × the Diag
/// block of 8: the queries sit in another block than their pairs, so the recall must go
/// through the NormAttention layer. Calibration: 13% after 50 steps, 79% from step 150
/// on (400 steps).
#[test]
fn a_t2_style_model_learns_mqar_beyond_its_diag_blocks() {
    let sets: Vec<&str> = SMALL.iter().copied().chain(["block=8"]).collect();
    let acc = final_accuracy("mqar-t2", "models/tasks/mqar_t2.tn", &sets, "mqar:pairs=2,vocab=16", 300, 32);
    assert!(acc >= 0.5, "MQAR accuracy {acc} (chance 0.125)");
}

/// The same task with every layer linear attention. Calibration: 34% after 150 steps,
/// 75% after 200, 79% after 400.
#[test]
fn the_all_norm_attention_model_learns_mqar() {
    let acc = final_accuracy("mqar-norm", "models/tasks/mqar_all_norm.tn", &SMALL, "mqar:pairs=2,vocab=16", 300, 32);
    assert!(acc >= 0.5, "MQAR accuracy {acc} (chance 0.125)");
}

/// The copy and MQAR tasks with bf16 products reach what the f32 runs reach (the same
/// thresholds: 0.9 and 0.5). Calibration (2026-12-03): copy 100% after 200 steps, as in
/// f32; MQAR with T2 77% after 300 (f32: 79%).
#[test]
fn bf16_products_learn_the_tasks_as_f32_does() {
    let sets: Vec<&str> = SMALL.iter().copied().chain(["block=16"]).collect();
    let acc = final_accuracy_in("copy-bf16", "models/tasks/mqar_t2.tn", &sets, "copy:vocab=16", (200, 16), "bf16");
    assert!(acc >= 0.9, "copy accuracy {acc} in bf16 (chance 1/14)");
    let sets: Vec<&str> = SMALL.iter().copied().chain(["block=8"]).collect();
    let data = "mqar:pairs=2,vocab=16";
    let acc = final_accuracy_in("mqar-t2-bf16", "models/tasks/mqar_t2.tn", &sets, data, (300, 32), "bf16");
    assert!(acc >= 0.5, "MQAR accuracy {acc} in bf16 (chance 0.125)");
}

/// Trains the copy model with `device` (`cpu` or `emulated`: GPU schedules for sm80 on
/// the emulated GPU) at B = 8, with `gemm` products on a GPU target, and returns the final
/// accuracy and every step's loss.
fn copy_run(device: &str, gemm: &str) -> (f64, Vec<f64>) {
    let out = std::env::temp_dir().join(format!("tnc-learning-copy-{device}-{gemm}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new(env!("CARGO_BIN_EXE_tnc"));
    c.env("TNC_CACHE_DIR", out.with_extension("cache"))
        .arg("train")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn"))
        .args(["--data", "copy:vocab=16", "--steps", "200", "--seq", "16", "--batch", "8", "--eval-batches", "2"])
        .args(["--lr", "1e-2", "--warmup", "10", "--threads", "2", "--seed", "0", "--device", device])
        .args(if device == "cpu" { vec![] } else { vec!["--gemm", gemm] })
        .arg("--out")
        .arg(&out);
    for s in SMALL.iter().chain(&["block=16"]) {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let records = tnc_train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    let accuracy = records.iter().rev().find_map(|r| r.get("eval_accuracy")?.as_f64()).expect("an evaluation");
    let losses = records.iter().filter_map(|r| r.get("loss")?.as_f64()).collect();
    eprintln!("copy on {device} ({gemm}): accuracy {:.1}%\n{stderr}", 100.0 * accuracy);
    (accuracy, losses)
}

/// GPU training without a GPU: the copy task trained 200 steps on sm80 schedules by the
/// emulated GPU (every kernel checked with GPU semantics first, then compiled for the
/// host) learns as on the CPU, and its loss curve follows the CPU run of the same seed.
/// The schedules sum in other orders, and training amplifies the difference: measured
/// (2026-12-03) at most 5e-7 nats over the first 50 steps, 8e-5 over 100 and 3.4e-3 over
/// all 200; the bounds are 1e-4, and 0.02 for any step. Calibration: 13% after 100
/// steps, 60% after 150, 100% after 200 (on both devices). The same with cuBLAS products
/// (`--gemm cublas`: the emulated GPU runs them as cuBLAS's calls), to the same bounds.
#[test]
fn the_copy_task_learns_on_the_emulated_gpu_as_on_the_cpu() {
    let (cpu, cpu_losses) = copy_run("cpu", "tiles");
    assert_eq!(cpu_losses.len(), 200);
    for gemm in ["tiles", "cublas"] {
        let (gpu, gpu_losses) = copy_run("emulated", gemm);
        assert!(gpu >= 0.9 && cpu >= 0.9, "copy accuracy {gpu} on the emulated GPU ({gemm}), {cpu} on the CPU");
        assert_eq!(gpu_losses.len(), 200);
        for (step, (g, c)) in gpu_losses.iter().zip(&cpu_losses).enumerate() {
            let bound = if step < 50 { 1e-4 } else { 0.02 };
            assert!((g - c).abs() <= bound, "step {}: loss {g} on the emulated GPU ({gemm}), {c} on the CPU", step + 1);
        }
    }
}

/// Trains a byte-level T1 (vocabulary 256) on this repository's language reference
/// (`docs/language.md`, ~9 KB) for 400 steps with `--precision`, and returns every
/// step's training loss.
fn text_run(precision: &str) -> Vec<f64> {
    let out = std::env::temp_dir().join(format!("tnc-learning-text-{precision}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = format!("text:{}", root.join("docs/language.md").display());
    let mut c = Command::new(env!("CARGO_BIN_EXE_tnc"));
    c.env("TNC_CACHE_DIR", out.with_extension("cache"))
        .arg("train")
        .arg(root.join("models/transnormer_t1.tn"))
        .args(["--data", &data, "--steps", "400", "--seq", "64", "--batch", "8", "--eval-every", "400"])
        .args(["--lr", "3e-3", "--warmup", "20", "--threads", "2", "--seed", "0", "--precision", precision])
        .arg("--out")
        .arg(&out);
    for s in ["vocab=256", "dim=64", "heads=2", "layers=2", "glu_dim=128", "block=16", "drop=0"] {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = tnc_train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    records.iter().filter_map(|r| r.get("loss")?.as_f64()).collect()
}

/// A byte-level language model trained with bf16 products follows the f32 loss curve:
/// the mean training loss of every 50 steps within 0.1 nats of the f32 run's (same
/// seed, same batches), and both learn (the last 50 steps below 2.5 nats, from ln 256 =
/// 5.5). Calibration (2026-12-03, an Emerald Rapids VM, bf16 products widened): means
/// 3.84, 2.81, 2.56, 2.33, 2.15, 2.02, 1.94, 1.90 in f32, at most 0.024 apart in bf16.
#[test]
fn a_byte_level_lm_in_bf16_follows_the_f32_loss_curve() {
    let (f32s, bf16s) = (text_run("f32"), text_run("bf16"));
    assert_eq!((f32s.len(), bf16s.len()), (400, 400));
    let means = |v: &[f64]| -> Vec<f64> { v.chunks(50).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect() };
    let (a, b) = (means(&f32s), means(&bf16s));
    eprintln!("mean loss per 50 steps, f32: {a:.3?}\n                        bf16: {b:.3?}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 0.1, "steps {}..{}: mean loss {x} in f32, {y} in bf16", 50 * i + 1, 50 * i + 50);
    }
    assert!(a[7] < 2.5 && b[7] < 2.5, "the last 50 steps' mean loss: {} in f32, {} in bf16", a[7], b[7]);
}

/// ListOps (LRA's task at small sizes: at most 2 levels of operators with 2–4 operands,
/// N 64, 10 classes) with the bidirectional encoder of `models/tasks/listops_encoder.tn`
/// at D 32: its validation accuracy beats always answering the most frequent class.
#[test]
fn an_encoder_learns_listops_beyond_the_majority_class() {
    let data = "listops:depth=2,args=4";
    let sets = ["dim=32", "heads=2", "layers=2", "ffn_dim=64", "block=16"];
    let acc = final_accuracy("listops", "models/tasks/listops_encoder.tn", &sets, data, 300, 64);
    // The most frequent class of the same validation rows (seed 0, batches of 32).
    let source = tnc_train::DataSource::parse(data).unwrap();
    let mut counts = [0usize; 10];
    let batches = source.eval_batches(0, 32, 64, 8).unwrap();
    for b in &batches {
        for &l in &b.labels {
            counts[l as usize] += 1;
        }
    }
    let majority = *counts.iter().max().unwrap() as f64 / counts.iter().sum::<usize>() as f64;
    eprintln!("listops: accuracy {:.1}%, majority class {:.1}% ({counts:?})", 100.0 * acc, 100.0 * majority);
    assert!(acc > majority + 0.1, "accuracy {acc:.3} against the majority class's {majority:.3}");
}

/// Labelled text from a file (`--data jsonl:PATH`, bytes): sentences whose class is
/// whether they contain "good" or "bad", at a random place among filler words. The
/// encoder learns it (100 steps; calibration: 100% on the 40 validation rows).
#[test]
fn an_encoder_learns_labelled_text_from_a_jsonl_file() {
    let path = std::env::temp_dir().join(format!("tnc-learning-sentiment-{}.jsonl", std::process::id()));
    let words = ["the", "a", "movie", "film", "plot", "actor", "scene", "was", "is", "very", "quite", "really"];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut lines = String::new();
    for _ in 0..400 {
        let label = next(2);
        let mut row: Vec<&str> = (0..3 + next(5)).map(|_| words[next(words.len())]).collect();
        row.insert(next(row.len() + 1), if label == 1 { "good" } else { "bad" });
        lines.push_str(&format!("{{\"text\": \"{}\", \"label\": {label}}}\n", row.join(" ")));
    }
    std::fs::write(&path, lines).unwrap();
    let sets = ["vocab=256", "classes=2", "dim=32", "heads=2", "layers=2", "ffn_dim=64", "block=16"];
    let data = format!("jsonl:{}", path.display());
    let acc = final_accuracy("jsonl", "models/tasks/listops_encoder.tn", &sets, &data, 100, 64);
    let _ = std::fs::remove_file(&path);
    assert!(acc >= 0.9, "accuracy {acc:.3}");
}
