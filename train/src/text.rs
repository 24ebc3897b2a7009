//! Text data: a file's tokens, its bytes (vocabulary 256) or its subword tokens
//! (`tokenizer.rs`).
//!
//! Split rule: for sequence length N, the last `max(ceil(10% of the tokens), N)` tokens
//! are validation and everything before them is training, so there is always at least
//! one validation window and the two parts never share a token. A training row is the N
//! tokens at a pseudo-random offset drawn from (seed, position, row) inside the training
//! part; the validation set is the consecutive, non-overlapping N-token windows of the
//! validation part from its start (a remainder shorter than N is unused).

use std::path::Path;

use crate::data::{Batch, Rng, TRAIN_SALT};

/// Reads the corpus, refusing a missing or empty file with an error that names it.
pub fn load(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("text data {}: {e}", path.display()))?;
    if bytes.is_empty() {
        return Err(format!("text data {}: the file is empty", path.display()));
    }
    Ok(bytes)
}

/// Where validation starts for sequence length `seq`, or why the file is too small.
pub fn split_point(path: &Path, len: usize, seq: usize) -> Result<usize, String> {
    let validation = len.div_ceil(10).max(seq);
    match len.checked_sub(validation) {
        Some(split) if split >= seq => Ok(split),
        _ => Err(format!(
            "text data {}: {len} tokens are too few for one training and one validation window of {seq} tokens \
             (validation is the last max(10%, {seq}) tokens; the file needs at least {} tokens, a token being a \
             byte without a tokenizer)",
            path.display(),
            min_len(seq)
        )),
    }
}

/// The smallest file that holds a training and a validation window of `seq` bytes.
fn min_len(seq: usize) -> usize {
    (2 * seq..).find(|&len| len - len.div_ceil(10).max(seq) >= seq).unwrap_or(2 * seq)
}

pub fn train_batch(
    path: &Path,
    tokens: &[i32],
    seed: u64,
    position: u64,
    batch: usize,
    seq: usize,
) -> Result<Batch, String> {
    let split = split_point(path, tokens.len(), seq)?;
    let mut rows = Vec::with_capacity(batch * seq);
    for row in 0..batch {
        let start = Rng::new(seed, TRAIN_SALT, position, row as u64).below(split - seq + 1);
        rows.extend_from_slice(&tokens[start..start + seq]);
    }
    Ok(Batch { tokens: rows, answers: vec![true; batch * (seq - 1)], labels: Vec::new(), batch, seq })
}

pub fn eval_batches(
    path: &Path,
    tokens: &[i32],
    batch: usize,
    seq: usize,
    max_batches: usize,
) -> Result<Vec<Batch>, String> {
    let split = split_point(path, tokens.len(), seq)?;
    let windows = ((tokens.len() - split) / seq).min(max_batches.saturating_mul(batch));
    let rows: Vec<&[i32]> = tokens[split..split + windows * seq].chunks_exact(seq).collect();
    Ok(rows
        .chunks(batch)
        .map(|chunk| Batch {
            tokens: chunk.iter().flat_map(|row| row.iter().copied()).collect(),
            answers: vec![true; chunk.len() * (seq - 1)],
            labels: Vec::new(),
            batch: chunk.len(),
            seq,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataSource;
    use std::io::Write;

    fn corpus(bytes: &[u8]) -> (tempfile::NamedTempFile, DataSource) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        let source = DataSource::parse(&format!("text:{}", file.path().display())).unwrap();
        (file, source)
    }

    /// 1000 bytes: byte i is `i % 251` in the training part (0..900) and 255 in validation.
    fn marked_corpus() -> (tempfile::NamedTempFile, DataSource) {
        corpus(&(0..1000).map(|i| if i < 900 { (i % 251) as u8 } else { 255 }).collect::<Vec<u8>>())
    }

    #[test]
    fn split_is_the_last_tenth_or_one_window() {
        let p = Path::new("x");
        assert_eq!(split_point(p, 1000, 16), Ok(900));
        assert_eq!(split_point(p, 1001, 16), Ok(900));
        assert_eq!(split_point(p, 100, 16), Ok(84));
        assert_eq!(split_point(p, 32, 16), Ok(16));
        let err = split_point(p, 31, 16).unwrap_err();
        assert!(err.contains("31 tokens") && err.contains("at least 32 tokens"), "{err}");
        assert_eq!(min_len(100), 200);
        assert_eq!(min_len(5), 10);
    }

    #[test]
    fn training_windows_stay_in_the_training_part() {
        let (_file, source) = marked_corpus();
        assert_eq!(source.vocab(), 256);
        let b = source.train_batch(5, 2, 4, 16).unwrap();
        assert_eq!(b, source.train_batch(5, 2, 4, 16).unwrap());
        assert_ne!(b.tokens, source.train_batch(5, 3, 4, 16).unwrap().tokens);
        assert!(b.answers.len() == 4 * 15 && b.answers.iter().all(|&a| a));
        for position in 0..500 {
            let b = source.train_batch(1, position, 8, 16).unwrap();
            for row in b.tokens.chunks(16) {
                // Contiguous bytes of the file, none from the validation part.
                assert!(row.windows(2).all(|w| (w[0] + 1) % 251 == w[1]), "{row:?}");
            }
        }
    }

    #[test]
    fn eval_windows_are_consecutive_from_the_split() {
        let (_file, source) = corpus(&(0..1000).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        // Validation is bytes 900..1000: six windows of 16 bytes, the last 4 bytes unused.
        let eval = source.eval_batches(0, 4, 16, 10).unwrap();
        assert_eq!(eval.iter().map(|b| b.batch).collect::<Vec<_>>(), vec![4, 2]);
        let all: Vec<i32> = eval.iter().flat_map(|b| b.tokens.iter().copied()).collect();
        let expected: Vec<i32> = (900..996).map(|i| i % 251).collect();
        assert_eq!(all, expected);
        assert_eq!(eval[1].answers.len(), 2 * 15);
        // max_batches limits the number of batches.
        assert_eq!(source.eval_batches(0, 4, 16, 1).unwrap().len(), 1);
    }

    #[test]
    fn too_small_or_missing_files_are_errors() {
        let (_file, source) = corpus(&[7; 20]);
        let err = source.train_batch(0, 0, 1, 16).unwrap_err();
        assert!(err.contains("20 tokens are too few"), "{err}");
        assert!(source.eval_batches(0, 1, 16, 1).is_err());
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = DataSource::parse(&format!("text:{}", empty.path().display())).unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }
}
