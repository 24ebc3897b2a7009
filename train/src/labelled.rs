//! Labelled sequences from a file, for classifiers: `--data jsonl:PATH`.
//!
//! One JSON object per line, with the sequence and its class:
//!
//! ```text
//! {"text": "a sentence", "label": 1}       bytes of the text (vocabulary 256)
//! {"tokens": [5, 17, 3], "label": 0}       token ids (vocabulary: the largest id + 1)
//! ```
//!
//! Every line has the same kind (all `text` or all `tokens`); labels are integers ≥ 0.
//! A row is cut to the sequence length N or padded after its end with token 0 (so 0 is
//! padding: a tokens file should not use it otherwise). With a tokenizer
//! (`jsonl:PATH?tokenizer=T.json`, or `--tokenizer`), each `text` is its subword tokens,
//! shifted by one so that 0 stays padding: vocabulary the tokenizer's + 1. The last 10% of the lines (at
//! least one) are the validation split, the rest training; training rows are drawn by
//! the seed and the batch position, so a resumed run sees the same batches.

use crate::data::{Batch, Rng};
use std::path::Path;

/// A labelled file's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    pub rows: Vec<(Vec<i32>, i32)>,
    pub vocab: usize,
    pub classes: usize,
    /// Rows `split..` are the validation split.
    pub split: usize,
}

pub fn load(path: &Path, tokenizer: Option<&Path>) -> Result<Labelled, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("jsonl data {}: {e}", path.display()))?;
    let mut rows = Vec::new();
    let mut line_of = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    let mut kind: Option<&str> = None;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: not a JSON object: {e}", at()))?;
        let label = value
            .get("label")
            .and_then(|l| l.as_u64())
            .and_then(|l| i32::try_from(l).ok())
            .ok_or_else(|| format!("{}: needs an integer `label` ≥ 0", at()))?;
        let (this, tokens) = match (value.get("text"), value.get("tokens")) {
            (Some(t), None) => {
                let t = t.as_str().ok_or_else(|| format!("{}: `text` must be a string", at()))?;
                texts.push(t.to_string());
                ("text", t.bytes().map(i32::from).collect())
            }
            (None, Some(t)) => {
                let ids = t.as_array().ok_or_else(|| format!("{}: `tokens` must be an array of token ids", at()))?;
                let ids: Option<Vec<i32>> =
                    ids.iter().map(|x| x.as_u64().and_then(|x| i32::try_from(x).ok())).collect();
                ("tokens", ids.ok_or_else(|| format!("{}: `tokens` must hold integers ≥ 0", at()))?)
            }
            _ => return Err(format!("{}: needs exactly one of `text` (a string) and `tokens` (token ids)", at())),
        };
        if kind.is_some_and(|k| k != this) {
            return Err(format!("{}: `{this}` after rows with `{}`; use one kind in a file", at(), kind.unwrap()));
        }
        kind = Some(this);
        rows.push((tokens, label));
        line_of.push(i + 1);
    }
    if rows.len() < 2 {
        return Err(format!("jsonl data {}: needs at least 2 rows (training and validation)", path.display()));
    }
    let vocab = match (kind, tokenizer) {
        (Some("text"), None) => 256,
        (Some("text"), Some(t)) => {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (ids, vocab) = crate::tokenizer::encode_texts(&texts, t)?;
            for ((tokens, _), ids) in rows.iter_mut().zip(ids) {
                *tokens = ids.into_iter().map(|id| id + 1).collect();
            }
            vocab + 1
        }
        (_, Some(_)) => {
            return Err(format!("jsonl data {}: a tokenizer applies to `text` rows, not to `tokens`", path.display()))
        }
        _ => rows.iter().flat_map(|(t, _)| t.iter().copied()).max().unwrap_or(0) as usize + 1,
    };
    // A row of padding only would leave a classifier nothing to pool (a mean over no
    // positions, NaN): refuse it here, naming the line.
    if let Some(r) = rows.iter().position(|(t, _)| t.iter().all(|&x| x == 0)) {
        return Err(format!("{}:{}: the row has no tokens (or only padding, id 0)", path.display(), line_of[r]));
    }
    let classes = rows.iter().map(|&(_, l)| l).max().unwrap_or(0) as usize + 1;
    let split = rows.len() - rows.len().div_ceil(10).max(1);
    Ok(Labelled { rows, vocab, classes, split })
}

/// A row cut or padded to `seq` tokens.
fn fitted(tokens: &[i32], seq: usize) -> impl Iterator<Item = i32> + '_ {
    tokens.iter().copied().chain(std::iter::repeat(0)).take(seq)
}

impl Labelled {
    pub fn train_batch(&self, seed: u64, salt: u64, position: u64, batch: usize, seq: usize) -> Batch {
        let mut out = Batch::labelled(batch, seq);
        for row in 0..batch {
            let (tokens, label) = &self.rows[Rng::new(seed, salt, position, row as u64).below(self.split)];
            out.tokens.extend(fitted(tokens, seq));
            out.labels.push(*label);
        }
        out
    }

    /// The validation rows in order, `batch` at a time (the last batch may be shorter).
    pub fn eval_batches(&self, batch: usize, seq: usize, max_batches: usize) -> Vec<Batch> {
        self.rows[self.split..]
            .chunks(batch)
            .take(max_batches)
            .map(|chunk| {
                let mut out = Batch::labelled(chunk.len(), seq);
                for (tokens, label) in chunk {
                    out.tokens.extend(fitted(tokens, seq));
                    out.labels.push(*label);
                }
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn reads_tokens_and_text_and_splits_off_validation() {
        let lines: String =
            (0..20).map(|i| format!("{{\"tokens\": [{}, 2, 3], \"label\": {}}}\n", i + 1, i % 3)).collect();
        let f = file(&lines);
        let l = load(f.path(), None).unwrap();
        assert_eq!((l.rows.len(), l.split, l.vocab, l.classes), (20, 18, 21, 3));
        let eval = l.eval_batches(4, 5, 10);
        assert_eq!(eval.len(), 1);
        assert_eq!(eval[0].tokens, [19, 2, 3, 0, 0, 20, 2, 3, 0, 0]);
        assert_eq!(eval[0].labels, [0, 1]);
        let b = l.train_batch(3, 1, 0, 8, 2);
        assert_eq!((b.tokens.len(), b.labels.len()), (16, 8));
        assert!(b.tokens.chunks(2).all(|r| r[0] <= 18 && r[1] == 2), "training rows only, cut to 2");
        assert_eq!(b, l.train_batch(3, 1, 0, 8, 2), "a pure function of (seed, position)");

        let f = file("{\"text\": \"ab\", \"label\": 1}\n\n{\"text\": \"c\", \"label\": 0}\n");
        let l = load(f.path(), None).unwrap();
        assert_eq!((l.vocab, l.classes, l.split), (256, 2, 1));
        assert_eq!(l.rows[0], (vec![97, 98], 1));
    }

    #[test]
    fn text_rows_take_a_tokenizer_with_ids_shifted_past_padding() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "the cat sat on the mat\nthe dog sat on the log\n".repeat(50)).unwrap();
        let tok = dir.path().join("tokenizer.json");
        let vocab = crate::tokenizer::train_bpe(&[corpus], 300, &tok).unwrap();
        let f = file("{\"text\": \"the cat\", \"label\": 1}\n{\"text\": \"the dog sat\", \"label\": 0}\n");
        let l = load(f.path(), Some(&tok)).unwrap();
        assert_eq!(l.vocab, vocab + 1);
        let (ids, _) = crate::tokenizer::encode_texts(&["the cat"], &tok).unwrap();
        let shifted: Vec<i32> = ids[0].iter().map(|i| i + 1).collect();
        assert_eq!(l.rows[0], (shifted, 1));
        assert!(l.rows.iter().all(|(t, _)| t.iter().all(|&i| i >= 1)), "0 is padding only");
        let tokens = file("{\"tokens\": [1], \"label\": 0}\n{\"tokens\": [2], \"label\": 1}\n");
        assert!(load(tokens.path(), Some(&tok)).unwrap_err().contains("applies to `text` rows"));
    }

    #[test]
    fn malformed_files_are_errors_with_the_line() {
        let cases = [
            ("{\"text\": \"a\"}\n{\"text\": \"b\", \"label\": 0}", ":1: needs an integer `label`"),
            ("{\"text\": \"a\", \"label\": -1}\n", ":1: needs an integer `label`"),
            ("{\"label\": 1}\n", "needs exactly one of `text`"),
            (
                "{\"text\": \"a\", \"label\": 1}\n{\"tokens\": [1], \"label\": 0}\n",
                ":2: `tokens` after rows with `text`",
            ),
            ("{\"tokens\": [1, -2], \"label\": 0}\n", "integers ≥ 0"),
            ("not json\n", ":1: not a JSON object"),
            ("{\"text\": \"a\", \"label\": 1}\n", "at least 2 rows"),
            ("{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"\", \"label\": 0}\n", ":3: the row has no tokens"),
            ("{\"tokens\": [0, 0], \"label\": 1}\n{\"tokens\": [1], \"label\": 0}\n", ":1: the row has no tokens"),
        ];
        for (text, want) in cases {
            let f = file(text);
            let e = load(f.path(), None).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
