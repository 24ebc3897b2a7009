//! `tnc check` and `tnc compile` warn about what recognition left unfused
//! (`compiler/src/lint.rs`): a cumulative sum of outer products that keeps a d×e state
//! for every position, and values of N×N positions; with the span, the bytes per token,
//! and why recognition did not apply. Shipped models get no such warning.

mod common;
use common::repo;
use std::process::Command;

/// Exit status and standard error of `tnc ARGS`.
fn tnc(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tnc")).args(args).current_dir(repo()).output().expect("tnc runs");
    (out.status.code().expect("exited normally"), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn models(dir: &std::path::Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("models/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            models(&path, out);
        } else if path.extension().is_some_and(|e| e == "tn") && !path.ends_with("std.tn") {
            out.push(path.strip_prefix(repo()).expect("under the repository").display().to_string());
        }
    }
}

#[test]
fn shipped_models_are_fused_without_warnings() {
    let mut all = Vec::new();
    models(&repo().join("models"), &mut all);
    assert!(all.len() >= 10, "{all:?}");
    for model in &all {
        let (code, err) = tnc(&["check", model]);
        assert_eq!(code, 0, "{model}: {err}");
        assert!(!err.contains("cumulative sum keeps") && !err.contains("N×N"), "{model}: {err}");
    }
}

/// A data-dependent gate per head and position in a cumsum was warned about (2,048 bytes
/// of state per token) until gates joined the linear-attention normal form: now it is
/// fused, and nothing is said.
#[test]
fn a_data_dependent_gate_in_a_cumsum_is_fused_without_warning() {
    fused_without_warning("tests/unfused/gated_cumsum.tn", "cumulative sum keeps");
}

/// `tnc check` and `tnc compile --report` of `model` succeed and print no warning (nor
/// `what`, the start of the one it used to get).
fn fused_without_warning(model: &str, what: &str) {
    for args in [vec!["check", model, "--seq", "4096"], vec!["compile", model, "--report", "--seq", "4096"]] {
        let (code, err) = tnc(&args);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains(what) && !err.contains("warning"), "{err}");
    }
}

/// The quadratic form of the same gate, with the segment-sum mask `exp(G_n − G_m)`: it
/// was warned about as N×N values until the recognizer read the mask as log-gates.
#[test]
fn a_segment_sum_decay_matrix_is_fused_without_warning() {
    fused_without_warning("tests/unfused/gated_quadratic.tn", "N×N");
}

#[test]
fn a_decay_matrix_of_another_form_is_warned_about_as_n_by_n_values() {
    // [B, 2, N, N] f32: 2 · N · 4 bytes per token, growing with N.
    for (n, bytes) in [("256", "2,048"), ("512", "4,096")] {
        let (code, err) = tnc(&["check", "tests/unfused/gaussian_decay.tn", "--seq", n]);
        assert_eq!(code, 0, "{err}");
        let message =
            format!("warning: 8 values of N×N positions: up to {bytes} bytes per token each at B = 1, N = {n}");
        assert!(err.contains(&message), "{err}");
        assert!(err.contains("gaussian_decay.tn:17:18") && err.contains("f32[B, 2, N, N]"), "{err}");
        assert!(err.contains("a decay matrix of another form"), "{err}");
    }
}
