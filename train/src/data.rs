//! Training data: where token batches come from.
//!
//! Every batch is a pure function of (seed, position): nothing is drawn from global or
//! stateful generators. A run that resumes at data position `p` therefore sees exactly
//! the batches an uninterrupted run would have seen from `p` on, and two machines given
//! the same seed train on the same stream.
//!
//! Most sources feed a causal language model whose loss is next-token cross-entropy at
//! every position, so each task is written as a sequence; [`Batch::answers`] marks the
//! predictions that measure the task (e.g. the recalled values of MQAR), for accuracy.
//! Labelled sources (ListOps, `jsonl:PATH`) feed a classifier: a class per sequence in
//! [`Batch::labels`], the model's `labels` input.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::labelled::{self, Labelled};
use crate::listops;
use crate::tasks;
use crate::text;
use crate::token_file::Tokens;

/// Randomness salts: training and evaluation draw from unrelated streams, so the
/// validation set is disjoint from training in its randomness (a short sequence over a
/// small vocabulary can still occur in both by chance, as in any i.i.d. split).
pub(crate) const TRAIN_SALT: u64 = 0x7472_6169_6e00_0001;
pub(crate) const EVAL_SALT: u64 = 0x6576_616c_0000_0002;

/// A source of token sequences.
#[derive(Clone)]
pub enum DataSource {
    /// Copy task: L random content tokens, a separator, the same L tokens again.
    /// `len` caps L (default: as long as fits, `(N - 1) / 2`).
    Copy { len: Option<usize>, vocab: usize },
    /// Multi-query associative recall (Zoology, arXiv 2312.04927) with `pairs` key-value pairs.
    Mqar { pairs: usize, vocab: usize },
    /// A text file's tokens: its bytes (vocabulary 256), or with a tokenizer
    /// (`text:PATH?tokenizer=TOKENIZER.json`) its subword tokens. For sequence length N the
    /// last `max(ceil(10% of the tokens), N)` tokens are validation, the rest training.
    Text { path: PathBuf, tokens: Arc<Tokens>, tokenizer: Option<TextTokenizer> },
    /// ListOps (Long-Range Arena): nested list operations over digits, labelled with
    /// their value; at most `depth` levels of operators with 2 to `args` operands.
    ListOps { depth: usize, args: usize },
    /// Labelled sequences from a JSON-lines file (`labelled.rs` has the format).
    Jsonl { path: PathBuf, data: Arc<Labelled>, tokenizer: Option<PathBuf> },
}

/// The tokenizer of a text source.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTokenizer {
    pub path: PathBuf,
    pub vocab: usize,
    /// Bytes of text per token over the whole file.
    pub bytes_per_token: f64,
}

/// B sequences of N tokens and the mask of predictions that count for accuracy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Tokens, B×N row-major.
    pub tokens: Vec<i32>,
    /// For a language model, B×(N-1) row-major: `answers[b * (N - 1) + n]` is true when
    /// the prediction made at position n (of token n + 1) is part of the task's answer.
    /// For a classifier, B values, all true (one prediction per sequence).
    pub answers: Vec<bool>,
    /// A class per sequence (B values) from a labelled source; empty otherwise.
    pub labels: Vec<i32>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// An empty labelled batch of `batch` rows to fill.
    pub(crate) fn labelled(batch: usize, seq: usize) -> Batch {
        Batch { tokens: Vec::with_capacity(batch * seq), answers: vec![true; batch], labels: Vec::new(), batch, seq }
    }

    /// How many predictions the loss averages over: a class per sequence, or the next
    /// token at every position but the last.
    pub fn predictions(&self) -> usize {
        if self.labels.is_empty() {
            self.batch * (self.seq - 1)
        } else {
            self.batch
        }
    }
}

const VALID: &str = "valid data sources: copy[:len=L,vocab=V], mqar[:pairs=K,vocab=V], \
                     text:PATH[?tokenizer=TOKENIZER.json], listops[:depth=D,args=A], \
                     jsonl:PATH[?tokenizer=TOKENIZER.json]";

/// What separates a text source's file from its tokenizer in a spec.
pub(crate) const TOKENIZER_KEY: &str = "?tokenizer=";

impl DataSource {
    /// `spec` with `--tokenizer`'s file, which applies to text sources only.
    pub fn spec_with_tokenizer(spec: &str, tokenizer: Option<&Path>) -> Result<String, String> {
        match tokenizer {
            None => Ok(spec.to_string()),
            Some(t)
                if (spec.trim_start().starts_with("text:") || spec.trim_start().starts_with("jsonl:"))
                    && !spec.contains(TOKENIZER_KEY) =>
            {
                Ok(format!("{spec}{TOKENIZER_KEY}{}", t.display()))
            }
            Some(_) if spec.contains(TOKENIZER_KEY) => {
                Err(format!("data source `{spec}` already names a tokenizer; drop `--tokenizer`"))
            }
            Some(_) => Err(format!("`--tokenizer` applies to text data (`text:PATH`, `jsonl:PATH`), not to `{spec}`")),
        }
    }

    /// Parses `copy`, `copy:len=16,vocab=32`, `mqar`, `mqar:pairs=8,vocab=64`, `text:PATH`
    /// or `text:PATH?tokenizer=TOKENIZER.json` (the tokenized file is cached next to it).
    pub fn parse(spec: &str) -> Result<DataSource, String> {
        DataSource::parse_warning(spec, &mut |_| {})
    }

    /// [`DataSource::parse`], with `warn` hearing what does not stop it (a cache that
    /// cannot be written).
    pub fn parse_warning(spec: &str, warn: &mut dyn FnMut(&str)) -> Result<DataSource, String> {
        let (name, args) = match spec.split_once(':') {
            Some((name, args)) => (name.trim(), Some(args)),
            None => (spec.trim(), None),
        };
        match name {
            "copy" => {
                let (mut len, mut vocab) = (None, 32);
                for (key, value) in key_values(spec, args, &["len", "vocab"])? {
                    match key {
                        "len" => len = Some(value),
                        _ => vocab = value,
                    }
                }
                DataSource::Copy { len, vocab }.validated()
            }
            "mqar" => {
                let (mut pairs, mut vocab) = (8, 64);
                for (key, value) in key_values(spec, args, &["pairs", "vocab"])? {
                    match key {
                        "pairs" => pairs = value,
                        _ => vocab = value,
                    }
                }
                DataSource::Mqar { pairs, vocab }.validated()
            }
            "text" => match args.map(|a| a.rsplit_once(TOKENIZER_KEY).unwrap_or((a, ""))) {
                Some((path, tok)) if !path.is_empty() && !tok.is_empty() => {
                    let path = PathBuf::from(path);
                    let e = crate::tokenizer::encode_file(&path, Path::new(tok), warn)?;
                    let tokenizer =
                        TextTokenizer { path: PathBuf::from(tok), vocab: e.vocab, bytes_per_token: e.bytes_per_token };
                    Ok(DataSource::Text { path, tokens: Arc::new(e.tokens), tokenizer: Some(tokenizer) })
                }
                Some((path, _)) if !path.is_empty() => {
                    let path = PathBuf::from(path);
                    let tokens = text::load(&path)?.into_iter().map(i32::from).collect();
                    Ok(DataSource::Text { path, tokens: Arc::new(Tokens::Owned(tokens)), tokenizer: None })
                }
                _ => Err(format!("data source `{spec}`: text needs a file, as in text:PATH")),
            },
            "listops" => {
                let (mut depth, mut operands) = (10, 10);
                for (key, value) in key_values(spec, args, &["depth", "args"])? {
                    match key {
                        "depth" => depth = value,
                        _ => operands = value,
                    }
                }
                DataSource::ListOps { depth, args: operands }.validated()
            }
            "jsonl" => match args.map(|a| a.trim().rsplit_once(TOKENIZER_KEY).unwrap_or((a.trim(), ""))) {
                Some((path, tok)) if !path.is_empty() => {
                    let path = PathBuf::from(path);
                    let tokenizer = (!tok.is_empty()).then(|| PathBuf::from(tok));
                    let data = Arc::new(labelled::load(&path, tokenizer.as_deref())?);
                    Ok(DataSource::Jsonl { path, data, tokenizer })
                }
                _ => Err(format!("data source `{spec}`: jsonl needs a file, as in jsonl:PATH")),
            },
            _ => Err(format!("unknown data source `{spec}`; {VALID}")),
        }
    }

    /// The number of distinct tokens; the model's vocabulary must be at least this.
    pub fn vocab(&self) -> usize {
        match self {
            DataSource::Copy { vocab, .. } | DataSource::Mqar { vocab, .. } => *vocab,
            DataSource::Text { tokenizer: Some(t), .. } => t.vocab,
            DataSource::Text { tokenizer: None, .. } => 256,
            DataSource::ListOps { .. } => listops::VOCAB,
            DataSource::Jsonl { data, .. } => data.vocab,
        }
    }

    /// The number of classes of a labelled source (`None`: token sequences, no labels).
    pub fn classes(&self) -> Option<usize> {
        match self {
            DataSource::ListOps { .. } => Some(listops::CLASSES),
            DataSource::Jsonl { data, .. } => Some(data.classes),
            _ => None,
        }
    }

    /// Batch number `position` of the training stream: a pure function of (seed, position).
    pub fn train_batch(&self, seed: u64, position: u64, batch: usize, seq: usize) -> Result<Batch, String> {
        check_shape(batch, seq)?;
        match *self {
            DataSource::Copy { len, vocab } => {
                synthetic(seed, TRAIN_SALT, position, batch, seq, |rng| tasks::copy(rng, len, vocab, seq))
            }
            DataSource::Mqar { pairs, vocab } => {
                synthetic(seed, TRAIN_SALT, position, batch, seq, |rng| tasks::mqar(rng, pairs, vocab, seq))
            }
            DataSource::Text { ref path, ref tokens, .. } => {
                text::train_batch(path, tokens, seed, position, batch, seq)
            }
            DataSource::ListOps { depth, args } => listops_batch(seed, TRAIN_SALT, position, batch, seq, depth, args),
            DataSource::Jsonl { ref data, .. } => Ok(data.train_batch(seed, TRAIN_SALT, position, batch, seq)),
        }
    }

    /// A fixed validation set of at most `max_batches` batches. Synthetic tasks draw it
    /// from a stream unrelated to training; text uses consecutive windows of its
    /// validation split (the last batch may have fewer rows, so every window is used).
    pub fn eval_batches(&self, seed: u64, batch: usize, seq: usize, max_batches: usize) -> Result<Vec<Batch>, String> {
        check_shape(batch, seq)?;
        let positions = 0..max_batches as u64;
        match *self {
            DataSource::Copy { len, vocab } => positions
                .map(|i| synthetic(seed, EVAL_SALT, i, batch, seq, |rng| tasks::copy(rng, len, vocab, seq)))
                .collect(),
            DataSource::Mqar { pairs, vocab } => positions
                .map(|i| synthetic(seed, EVAL_SALT, i, batch, seq, |rng| tasks::mqar(rng, pairs, vocab, seq)))
                .collect(),
            DataSource::Text { ref path, ref tokens, .. } => text::eval_batches(path, tokens, batch, seq, max_batches),
            DataSource::ListOps { depth, args } => {
                positions.map(|i| listops_batch(seed, EVAL_SALT, i, batch, seq, depth, args)).collect()
            }
            DataSource::Jsonl { ref data, .. } => Ok(data.eval_batches(batch, seq, max_batches)),
        }
    }

    /// Checks what can be checked before the sequence length is known.
    fn validated(self) -> Result<DataSource, String> {
        match self {
            DataSource::Copy { len, vocab } => {
                if vocab < 3 {
                    return Err(format!("copy: vocab={vocab} is too small; it needs padding 0, separator 1 and at least one content token (vocab >= 3)"));
                }
                if len == Some(0) {
                    return Err("copy: len must be at least 1".into());
                }
            }
            DataSource::Mqar { pairs, vocab } => {
                if pairs == 0 {
                    return Err("mqar: pairs must be at least 1".into());
                }
                let keys = tasks::mqar_key_count(vocab);
                if pairs > keys {
                    return Err(format!("mqar: {pairs} distinct keys do not fit vocab={vocab}, which has {keys} keys (keys are tokens 1..={keys}, values the rest)"));
                }
            }
            DataSource::ListOps { depth, args } => {
                if depth == 0 || args < 2 {
                    return Err(format!("listops: depth={depth}, args={args}: depth must be ≥ 1 and args ≥ 2"));
                }
            }
            DataSource::Text { .. } | DataSource::Jsonl { .. } => {}
        }
        Ok(self)
    }
}

/// The canonical spec, which parses back to the same source.
impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Copy { len: Some(len), vocab } => write!(f, "copy:len={len},vocab={vocab}"),
            DataSource::Copy { len: None, vocab } => write!(f, "copy:vocab={vocab}"),
            DataSource::Mqar { pairs, vocab } => write!(f, "mqar:pairs={pairs},vocab={vocab}"),
            DataSource::Text { path, tokenizer: None, .. } => write!(f, "text:{}", path.display()),
            DataSource::Text { path, tokenizer: Some(t), .. } => {
                write!(f, "text:{}{TOKENIZER_KEY}{}", path.display(), t.path.display())
            }
            DataSource::ListOps { depth, args } => write!(f, "listops:depth={depth},args={args}"),
            DataSource::Jsonl { path, tokenizer: None, .. } => write!(f, "jsonl:{}", path.display()),
            DataSource::Jsonl { path, tokenizer: Some(t), .. } => {
                write!(f, "jsonl:{}{TOKENIZER_KEY}{}", path.display(), t.display())
            }
        }
    }
}

/// Shown without the file's bytes.
impl fmt::Debug for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Text { path, tokens, tokenizer } => {
                write!(f, "Text {{ path: {path:?}, tokens: {}, tokenizer: {tokenizer:?} }}", tokens.len())
            }
            DataSource::Jsonl { path, data, tokenizer } => {
                write!(f, "Jsonl {{ path: {path:?}, rows: {}, tokenizer: {tokenizer:?} }}", data.rows.len())
            }
            other => write!(f, "{other}"),
        }
    }
}

fn key_values<'a>(spec: &str, args: Option<&'a str>, keys: &[&str]) -> Result<Vec<(&'a str, usize)>, String> {
    let Some(args) = args else { return Ok(Vec::new()) };
    let mut out: Vec<(&str, usize)> = Vec::new();
    for item in args.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("data source `{spec}`: expected key=value, found `{item}`"));
        };
        let key = key.trim();
        if !keys.contains(&key) {
            return Err(format!("data source `{spec}`: unknown key `{key}`; valid keys: {}", keys.join(", ")));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("data source `{spec}`: `{key}` is given twice"));
        }
        let value = value.trim().parse().map_err(|_| {
            format!("data source `{spec}`: `{key}` needs a non-negative integer, found `{}`", value.trim())
        })?;
        out.push((key, value));
    }
    Ok(out)
}

/// One batch of a synthetic task whose rows are drawn by `row_fn` from per-row generators.
fn synthetic(
    seed: u64,
    salt: u64,
    position: u64,
    batch: usize,
    seq: usize,
    row_fn: impl Fn(&mut Rng) -> Result<(Vec<i32>, Vec<bool>), String>,
) -> Result<Batch, String> {
    let mut out = Batch {
        tokens: Vec::with_capacity(batch * seq),
        answers: Vec::with_capacity(batch * (seq - 1)),
        labels: Vec::new(),
        batch,
        seq,
    };
    for row in 0..batch {
        let (tokens, answers) = row_fn(&mut Rng::new(seed, salt, position, row as u64))?;
        out.tokens.extend(tokens);
        out.answers.extend(answers);
    }
    Ok(out)
}

/// One batch of ListOps rows, each from its own generator.
fn listops_batch(
    seed: u64,
    salt: u64,
    position: u64,
    batch: usize,
    seq: usize,
    depth: usize,
    args: usize,
) -> Result<Batch, String> {
    let mut out = Batch::labelled(batch, seq);
    for row in 0..batch {
        let (tokens, label) = listops::row(&mut Rng::new(seed, salt, position, row as u64), depth, args, seq)?;
        out.tokens.extend(tokens);
        out.labels.push(label);
    }
    Ok(out)
}

fn check_shape(batch: usize, seq: usize) -> Result<(), String> {
    if batch == 0 {
        return Err("batch size must be at least 1".into());
    }
    if batch.checked_mul(seq).is_none() {
        return Err(format!("a batch of {batch}×{seq} tokens is too large"));
    }
    if seq < 2 {
        return Err(format!("sequence length {seq} is too short: next-token prediction needs at least 2 tokens"));
    }
    Ok(())
}

/// A counter-based generator (SplitMix64 output over a key hashed from the coordinates):
/// the i-th draw of row `row` of batch `position` is the same wherever and whenever it
/// is computed, which is all resumption needs; quality is ample for sampling tokens.
pub(crate) struct Rng {
    key: u64,
    counter: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub(crate) fn new(seed: u64, salt: u64, position: u64, row: u64) -> Rng {
        let key = [salt, position, row].iter().fold(mix(seed.wrapping_add(GOLDEN)), |h, &x| mix(h ^ mix(x)));
        Rng { key, counter: 0 }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        mix(self.key.wrapping_add(self.counter.wrapping_mul(GOLDEN)))
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift; the bias is below n / 2^64.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_with_defaults() {
        assert_eq!(DataSource::parse("copy").unwrap().to_string(), "copy:vocab=32");
        assert_eq!(DataSource::parse("copy:len=16,vocab=40").unwrap().to_string(), "copy:len=16,vocab=40");
        assert_eq!(DataSource::parse("mqar").unwrap().to_string(), "mqar:pairs=8,vocab=64");
        assert_eq!(DataSource::parse("mqar:vocab=128").unwrap().to_string(), "mqar:pairs=8,vocab=128");
        assert_eq!(DataSource::parse("mqar:pairs=4, vocab=16").unwrap().vocab(), 16);
    }

    #[test]
    fn rejects_bad_specs_with_the_valid_choices() {
        let err = |s: &str| DataSource::parse(s).unwrap_err();
        assert!(err("cpy").contains("copy[:len=L,vocab=V], mqar[:pairs=K,vocab=V], text:PATH"), "{}", err("cpy"));
        assert!(err("copy:length=3").contains("valid keys: len, vocab"));
        assert!(err("mqar:keys=3").contains("valid keys: pairs, vocab"));
        assert!(err("mqar:pairs=x").contains("non-negative integer, found `x`"));
        assert!(err("mqar:pairs").contains("expected key=value"));
        assert!(err("mqar:pairs=2,pairs=3").contains("given twice"));
        assert!(err("mqar:pairs=0").contains("at least 1"));
        assert!(err("mqar:pairs=9,vocab=16").contains("7 keys"));
        assert!(err("copy:vocab=2").contains("vocab >= 3"));
        assert!(err("text").contains("text:PATH"));
        assert!(err("text:/nonexistent/corpus.txt").contains("/nonexistent/corpus.txt"));
    }

    #[test]
    fn batches_are_pure_functions_of_seed_and_position() {
        for spec in ["copy", "mqar"] {
            let source = DataSource::parse(spec).unwrap();
            let a = source.train_batch(7, 3, 4, 64).unwrap();
            assert_eq!(a, source.train_batch(7, 3, 4, 64).unwrap());
            assert_ne!(a.tokens, source.train_batch(7, 4, 4, 64).unwrap().tokens);
            assert_ne!(a.tokens, source.train_batch(8, 3, 4, 64).unwrap().tokens);
            // Rows of one batch differ from each other.
            assert_ne!(a.tokens[..64], a.tokens[64..128]);
        }
    }

    #[test]
    fn eval_set_is_fixed_and_unlike_training() {
        let source = DataSource::parse("mqar").unwrap();
        let eval = source.eval_batches(1, 2, 64, 3).unwrap();
        assert_eq!(eval.len(), 3);
        assert_eq!(eval, source.eval_batches(1, 2, 64, 3).unwrap());
        for (i, batch) in eval.iter().enumerate() {
            assert_ne!(batch.tokens, source.train_batch(1, i as u64, 2, 64).unwrap().tokens);
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let source = DataSource::parse("copy").unwrap();
        assert!(source.train_batch(0, 0, 0, 16).unwrap_err().contains("batch size"));
        assert!(source.train_batch(0, 0, 1, 1).unwrap_err().contains("too short"));
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut rng = Rng::new(1, 2, 3, 4);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[rng.below(4)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }

    #[test]
    fn a_tokenizer_applies_to_text_once() {
        let t = Some(Path::new("tok.json"));
        assert_eq!(DataSource::spec_with_tokenizer("text:a.txt", t).unwrap(), "text:a.txt?tokenizer=tok.json");
        assert_eq!(DataSource::spec_with_tokenizer("copy", None).unwrap(), "copy");
        assert!(DataSource::spec_with_tokenizer("copy", t).unwrap_err().contains("applies to text data"));
        let twice = DataSource::spec_with_tokenizer("text:a.txt?tokenizer=x.json", t).unwrap_err();
        assert!(twice.contains("already names a tokenizer"), "{twice}");
        let missing = DataSource::parse("text:/nonexistent/a.txt?tokenizer=/nonexistent/tok.json").unwrap_err();
        assert!(missing.contains("/nonexistent/tok.json"), "{missing}");
    }
}
