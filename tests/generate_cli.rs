//! `tnc generate`: a copy-task model trained by `tnc train` copies its prompt under greedy
//! decoding; a small T1 trained on a real text with a subword tokenizer generates words
//! of that text; sampling is reproducible from its seed; bad prompts and settings are
//! usage errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fresh(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tnc-generate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tnc(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tnc"));
    c.env("TNC_CACHE_DIR", cache);
    c
}

/// (exit status, stdout, stderr).
fn run(mut c: Command) -> (i32, String, String) {
    let o = c.output().expect("tnc runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.code().expect("exited normally"), text(&o.stdout), text(&o.stderr))
}

fn generate(cache: &Path, run_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut c = tnc(cache);
    c.arg("generate").arg(run_dir).args(args);
    run(c)
}

/// The copy task (7 content tokens, the separator 1, the same 7 again) as in
/// `tests/learning.rs`: 98–100% answer accuracy after 200 steps.
#[test]
fn a_copy_model_copies_its_prompt_under_greedy_decoding() {
    let dir = fresh("copy");
    let cache = dir.join("cache");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tasks/mqar_t2.tn");
    let mut c = tnc(&cache);
    c.arg("train").arg(&model).args(["--data", "copy:vocab=16", "--steps", "200", "--seq", "16", "--batch", "8"]);
    c.args(["--eval-batches", "2", "--lr", "1e-2", "--warmup", "10", "--threads", "2", "--seed", "0", "--quiet"]);
    for s in ["vocab=16", "dim=32", "heads=2", "layers=2", "glu_dim=64", "block=16"] {
        c.args(["--set", s]);
    }
    let run_dir = dir.join("run");
    c.arg("--out").arg(&run_dir);
    let (code, _, err) = run(c);
    assert_eq!(code, 0, "{err}");
    let prompts = [[4, 11, 15, 14, 14, 3, 6], [2, 9, 9, 13, 5, 7, 12], [15, 3, 8, 2, 10, 6, 4]];
    let mut right = 0;
    let mut greedy = Vec::new();
    for p in &prompts {
        let content: Vec<String> = p.iter().map(|t| t.to_string()).collect();
        let prompt = format!("{} 1", content.join(" "));
        let (code, out, err) =
            generate(&cache, &run_dir, &["--prompt", &prompt, "--max-tokens", "7", "--temperature", "0"]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("generated 7 tokens") && err.contains("tokens/s"), "{err}");
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 15, "{out}");
        assert_eq!(words[..8].join(" "), prompt, "the prompt comes first: {out}");
        right += words[8..].iter().zip(&content).filter(|(a, b)| *a == b).count();
        // Greedy decoding is deterministic.
        let again = generate(&cache, &run_dir, &["--prompt", &prompt, "--max-tokens", "7", "--temperature", "0"]);
        assert_eq!(again.1, out);
        greedy.push((prompt, out));
    }
    assert!(right >= 19, "{right} of 21 tokens copied");

    // A batch: the three prompts (one length, one batch) and a shorter one (a batch of its
    // own), each continued as it is alone, printed in the file's order.
    let (_, short, _) = generate(&cache, &run_dir, &["--prompt", "4 5 1", "--max-tokens", "7", "--temperature", "0"]);
    let file = dir.join("prompts.txt");
    let lines: Vec<&str> = vec![&greedy[0].0, "4 5 1", &greedy[1].0, &greedy[2].0];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (code, out, err) =
        generate(&cache, &run_dir, &["--batch", file.to_str().unwrap(), "--max-tokens", "7", "--temperature", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("generated 28 tokens"), "{err}");
    let alone = [&greedy[0].1, &short, &greedy[1].1, &greedy[2].1];
    let want: String = alone.iter().enumerate().map(|(i, o)| format!("# prompt {}\n{o}", i + 1)).collect();
    assert_eq!(out, want);

    // On GPU schedules (the GPU-semantics executor): the same greedy text.
    let (code, out, err) = generate(
        &cache,
        &run_dir,
        &[
            "--prompt",
            &greedy[0].0,
            "--max-tokens",
            "7",
            "--temperature",
            "0",
            "--target",
            "sm80",
            "--device",
            "emulated",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, greedy[0].1, "{err}");

    // Sampling: the same seed, the same tokens.
    let sampled = |seed: &str| generate(&cache, &run_dir, &["--prompt", "4 5 1", "--max-tokens", "12", "--seed", seed]);
    let (code, first, err) = sampled("5");
    assert_eq!(code, 0, "{err}");
    assert_eq!(sampled("5").1, first);
    // Bad prompts and settings: usage errors, nothing generated.
    for (args, want) in [
        (vec!["--prompt", "4 99 1"], "outside the model's vocabulary"),
        (vec!["--prompt", "four"], "token ids"),
        (vec!["--prompt", "4 1", "--temperature", "-1"], "--temperature"),
        (vec!["--prompt", "4 1", "--top-p", "0"], "--top-p"),
    ] {
        let (code, out, err) = generate(&cache, &run_dir, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty() && err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = generate(&cache, &dir.join("nothing"), &["--prompt", "4 1"]);
    assert_ne!(code, 0);
    assert!(err.contains("neither a run directory nor a checkpoint"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A byte-level BPE of 512 tokens trained on the GPL (Debian ships it; else tnc's own
/// language reference), T1 at dim 64 trained 300 steps on its subwords (~10 s in
/// release): greedy text whose words mostly occur in the corpus.
#[test]
fn a_model_trained_on_a_text_generates_its_words() {
    let dir = fresh("text");
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache");
    let gpl = Path::new("/usr/share/common-licenses/GPL-3");
    let source =
        if gpl.exists() { gpl.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/language.md") };
    let corpus = dir.join("corpus.txt");
    std::fs::copy(&source, &corpus).unwrap();
    let tok = dir.join("tokenizer.json");
    let mut c = tnc(&cache);
    c.args(["tokenizer", "train"]).arg(&corpus).args(["--vocab", "512", "-o"]).arg(&tok);
    let (code, _, err) = run(c);
    assert_eq!(code, 0, "{err}");
    let mut c = tnc(&cache);
    c.arg("train").arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/transnormer_t1.tn"));
    for s in ["vocab=512", "dim=64", "heads=2", "layers=2", "glu_dim=128", "drop=0"] {
        c.args(["--set", s]);
    }
    c.arg("--data").arg(format!("text:{}", corpus.display())).arg("--tokenizer").arg(&tok);
    c.args(["--batch", "8", "--seq", "64", "--steps", "300", "--lr", "3e-3", "--seed", "0", "--quiet", "--out"]);
    let run_dir = dir.join("run");
    c.arg(&run_dir);
    let (code, _, err) = run(c);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        generate(&cache, &run_dir, &["--prompt", "This License", "--max-tokens", "80", "--temperature", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("This License"), "{out}");
    let text = std::fs::read_to_string(&corpus).unwrap().to_lowercase();
    let known: std::collections::HashSet<&str> = text.split(|c: char| !c.is_alphabetic()).collect();
    let words: Vec<String> = out["This License".len()..]
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let found = words.iter().filter(|w| known.contains(w.as_str())).count();
    assert!(
        words.len() >= 10 && found * 10 >= words.len() * 7,
        "{found} of {} words in the corpus:\n{out}",
        words.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A softmax transformer keeps a KV cache of `--context` rows: it generates until the
/// cache is full (the step at position C − 1 writes its last row; the token after it is
/// the last), says so, and refuses a prompt longer than the cache.
#[test]
fn a_softmax_model_stops_at_a_full_kv_cache() {
    let dir = fresh("kv-cache");
    let cache = dir.join("cache");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/transformer.tn");
    let mut c = tnc(&cache);
    c.arg("train").arg(&model).args(["--data", "copy:vocab=16", "--steps", "3", "--seq", "16", "--batch", "2"]);
    c.args(["--eval-batches", "1", "--threads", "2", "--seed", "0", "--quiet"]);
    for s in ["vocab=16", "dim=16", "heads=2", "layers=1", "glu_dim=24"] {
        c.args(["--set", s]);
    }
    let run_dir = dir.join("run");
    c.arg("--out").arg(&run_dir);
    let (code, _, err) = run(c);
    assert_eq!(code, 0, "{err}");
    let args = ["--prompt", "4 5 1", "--context", "8", "--max-tokens", "20", "--temperature", "0"];
    let (code, out, err) = generate(&cache, &run_dir, &args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.split_whitespace().count(), 9, "8 rows of cache and the token after them: {out}");
    assert!(err.contains("full KV cache of 8 tokens") && err.contains("generated 6 tokens"), "{err}");
    let (code, out, err) = generate(&cache, &run_dir, &["--prompt", "1 2 3 4 5 6 7 8 9", "--context", "8"]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty() && err.contains("has 9 tokens but the model's KV cache holds 8"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
