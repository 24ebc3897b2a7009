//! Subword tokenizers for text data (Hugging Face's `tokenizers` crate): training a
//! byte-level BPE (`tnc tokenizer train`), and encoding a text file with any
//! `tokenizer.json`, cached next to the file so that a large corpus is encoded once.
//!
//! The cache is `FILE.tok-<hash>.tokens`, the hash over the tokenizer's JSON and the
//! text's bytes (so an edited file or another tokenizer never reuses it): an 8-byte magic
//! `TNCTOK1\n`, the token count (u64 LE), then every id as u32 LE. It is written to a
//! temporary file and renamed; a cache that cannot be written is skipped with the reason.
//! A cache that is there is memory-mapped (`token_file.rs`), not read: renaming a new
//! cache over it leaves a mapping of the old file intact.

use crate::token_file::{Mapping, Tokens};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};
use tokenizers::{Tokenizer, TokenizerBuilder};

const MAGIC: &[u8; 8] = b"TNCTOK1\n";

/// A text file encoded by a tokenizer.
pub struct Encoded {
    pub tokens: Tokens,
    /// The ids the tokenizer can produce, special tokens included: one past its largest id.
    pub vocab: usize,
    /// Bytes of text per token over the whole file (for bits per byte).
    pub bytes_per_token: f64,
    /// Whether the tokens came from the cache.
    pub cached: bool,
}

/// The largest `--vocab` a tokenizer is trained for: 2^21, eight times the largest
/// vocabularies in use, and far below what token ids (i32) and memory allow.
pub const MAX_VOCAB: usize = 1 << 21;

/// Where a tokenizer may be written: not over one of the text files it learns from, and
/// not over an existing file unless that is a tokenizer too (a new one replaces it).
fn check_output(files: &[PathBuf], out: &Path) -> Result<(), String> {
    let Ok(existing) = std::fs::canonicalize(out) else { return Ok(()) };
    if files.iter().any(|f| std::fs::canonicalize(f).is_ok_and(|f| f == existing)) {
        return Err(format!("-o {} is one of the text files: writing the tokenizer would replace it", out.display()));
    }
    let is_tokenizer = std::fs::read(out).is_ok_and(|json| Tokenizer::from_bytes(&json).is_ok());
    if !is_tokenizer {
        return Err(format!(
            "-o {} exists and is not a tokenizer: remove it or write the tokenizer elsewhere",
            out.display()
        ));
    }
    Ok(())
}

/// Trains a byte-level BPE of `vocab` tokens (256 bytes, one special `<|endoftext|>`,
/// and merges) on `files` and writes it to `out` as a `tokenizer.json`.
pub fn train_bpe(files: &[PathBuf], vocab: usize, out: &Path) -> Result<usize, String> {
    if vocab < 257 {
        return Err(format!("--vocab {vocab} is too small: a byte-level BPE has 256 byte tokens and a special one"));
    }
    if vocab > MAX_VOCAB {
        return Err(format!(
            "--vocab {vocab} is too large: at most {MAX_VOCAB} tokens (the trainer's tables grow with it)"
        ));
    }
    for f in files {
        std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    check_output(files, out)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
            .with_decoder(Some(ByteLevel::default().into()))
            .build()
            .map_err(|e| format!("building the tokenizer: {e}"))?;
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    tok.train_from_files(&mut trainer, names).map_err(|e| format!("training the tokenizer: {e}"))?;
    tok.save(out, true).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(tok.get_vocab_size(true))
}

/// The ids a tokenizer can produce: one past its largest id. Not its count of tokens,
/// which is less when the ids have gaps (a hand-edited or merged tokenizer.json), so a
/// model sized by the count would meet ids past its vocabulary.
fn id_space(tok: &Tokenizer) -> usize {
    tok.get_vocab(true).values().max().map_or(0, |&id| id as usize + 1)
}

/// `text` encoded by the tokenizer in `tokenizer`, from the cache when it holds this
/// pair; `warn` hears why a cache could not be written.
pub fn encode_file(text: &Path, tokenizer: &Path, warn: &mut dyn FnMut(&str)) -> Result<Encoded, String> {
    let json = std::fs::read(tokenizer).map_err(|e| format!("tokenizer {}: {e}", tokenizer.display()))?;
    let tok = Tokenizer::from_bytes(&json).map_err(|e| format!("tokenizer {}: {e}", tokenizer.display()))?;
    let vocab = id_space(&tok);
    let bytes = std::fs::read(text).map_err(|e| format!("text data {}: {e}", text.display()))?;
    let utf8 = std::str::from_utf8(&bytes).map_err(|e| format!("text data {}: not UTF-8 ({e})", text.display()))?;
    if bytes.is_empty() {
        return Err(format!("text data {}: the file is empty", text.display()));
    }
    let cache = cache_path(text, &json, &bytes);
    let done = |tokens: Tokens, cached| {
        let bytes_per_token = bytes.len() as f64 / tokens.len().max(1) as f64;
        Encoded { tokens, vocab, bytes_per_token, cached }
    };
    if let Some(tokens) = read_cache(&cache) {
        return Ok(done(tokens, true));
    }
    let tokens = encode(&tok, utf8)?;
    if let Err(e) = write_cache(&cache, &tokens) {
        warn(&format!("the tokenized corpus is not cached ({}: {e})", cache.display()));
    }
    Ok(done(Tokens::Owned(tokens), false))
}

/// Each of `texts` encoded by the tokenizer in `tokenizer`: (the ids of each, one past the
/// tokenizer's largest id).
pub fn encode_texts(texts: &[&str], tokenizer: &Path) -> Result<(Vec<Vec<i32>>, usize), String> {
    let json = std::fs::read(tokenizer).map_err(|e| format!("tokenizer {}: {e}", tokenizer.display()))?;
    let tok = Tokenizer::from_bytes(&json).map_err(|e| format!("tokenizer {}: {e}", tokenizer.display()))?;
    let encodings = tok.encode_batch(texts.to_vec(), false).map_err(|e| format!("tokenizing: {e}"))?;
    let ids = encodings
        .iter()
        .map(|e| {
            e.get_ids()
                .iter()
                .map(|&id| i32::try_from(id).map_err(|_| format!("token id {id} does not fit an i32")))
                .collect()
        })
        .collect::<Result<_, String>>()?;
    Ok((ids, id_space(&tok)))
}

/// The whole text, encoded in pieces of about 1 MiB cut after a newline (byte-level
/// pre-tokenization never joins across one), in parallel.
fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<i32>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(1 << 20);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        if let Some(nl) = rest[..cut].rfind('\n').filter(|_| cut < rest.len()) {
            cut = nl + 1;
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    let encodings = tok.encode_batch(pieces, false).map_err(|e| format!("tokenizing: {e}"))?;
    let mut ids = Vec::new();
    for e in encodings {
        for &id in e.get_ids() {
            ids.push(i32::try_from(id).map_err(|_| format!("token id {id} does not fit an i32"))?);
        }
    }
    Ok(ids)
}

fn cache_path(text: &Path, tokenizer_json: &[u8], bytes: &[u8]) -> PathBuf {
    let mut h = Sha256::new();
    h.update((tokenizer_json.len() as u64).to_le_bytes());
    h.update(tokenizer_json);
    h.update(bytes);
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut name = text.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tok-{hash}.tokens"));
    text.with_file_name(name)
}

/// The cached ids, memory-mapped where the machine allows, else read.
fn read_cache(path: &Path) -> Option<Tokens> {
    use std::io::Read;
    let mut head = [0u8; 16];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let count = usize::try_from(u64::from_le_bytes(head[8..16].try_into().ok()?)).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    if let Some(m) = Mapping::open(path, 16, count) {
        return Some(Tokens::Mapped(m));
    }
    let b = std::fs::read(path).ok()?;
    let body = b.get(16..)?;
    if body.len() != count.checked_mul(4)? {
        return None;
    }
    let ids = body.chunks_exact(4).map(|c| i32::try_from(u32::from_le_bytes(c.try_into().ok()?)).ok());
    ids.collect::<Option<Vec<i32>>>().map(Tokens::Owned)
}

fn write_cache(path: &Path, tokens: &[i32]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(16 + 4 * tokens.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        out.extend_from_slice(&(t as u32).to_le_bytes());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &out)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BPE trained on a small corpus encodes it in fewer tokens than bytes, decodes back
    /// to the text exactly, has the vocabulary asked for, and its encoding of a file is
    /// cached: the second encoding reads the cache and gives the same ids; another
    /// tokenizer does not reuse it.
    #[test]
    fn a_trained_bpe_round_trips_and_its_encoding_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        let text: String =
            (0..400).map(|i| format!("linear attention number {i} keeps a state of d by e per head.\n")).collect();
        std::fs::write(&corpus, &text).unwrap();
        let tok_path = dir.path().join("tokenizer.json");
        // As many tokens as asked for, or fewer when the text has no more pairs to merge.
        let vocab = train_bpe(std::slice::from_ref(&corpus), 320, &tok_path).unwrap();
        assert_eq!(vocab, 320);
        let mut warnings = Vec::new();
        let first = encode_file(&corpus, &tok_path, &mut |w| warnings.push(w.to_string())).unwrap();
        assert!(!first.cached && warnings.is_empty(), "{warnings:?}");
        assert_eq!(first.vocab, 320);
        assert!(first.tokens.iter().all(|&t| (0..320).contains(&t)));
        assert!(first.bytes_per_token > 2.0, "{} bytes per token", first.bytes_per_token);
        let tok = Tokenizer::from_file(&tok_path).unwrap();
        let ids: Vec<u32> = first.tokens.iter().map(|&t| t as u32).collect();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let second = encode_file(&corpus, &tok_path, &mut |_| {}).unwrap();
        assert!(second.cached);
        assert_eq!(*second.tokens, *first.tokens);
        // The cache is memory-mapped (little-endian machines).
        assert_eq!(matches!(second.tokens, Tokens::Mapped(_)), cfg!(target_endian = "little"));
        let other = dir.path().join("other.json");
        train_bpe(std::slice::from_ref(&corpus), 300, &other).unwrap();
        let third = encode_file(&corpus, &other, &mut |_| {}).unwrap();
        assert!(!third.cached && third.vocab == 300);
        assert!(train_bpe(&[corpus], 100, &other).unwrap_err().contains("too small"));
    }

    /// A tokenizer whose ids have a gap (a token moved to id 999, after at most 320) gives
    /// the data a vocabulary of 1,000 ids, not its count of tokens, so the model is sized
    /// to every id it can meet.
    #[test]
    fn the_vocabulary_covers_the_largest_id() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "a state of d by e per head\n".repeat(200)).unwrap();
        let tok_path = dir.path().join("tokenizer.json");
        assert!(train_bpe(std::slice::from_ref(&corpus), 320, &tok_path).unwrap() <= 320);
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
        // The token for "Ġhead" moves to id 999, leaving a gap.
        json["model"]["vocab"]["Ġhead"] = serde_json::json!(999);
        std::fs::write(&tok_path, serde_json::to_vec(&json).unwrap()).unwrap();
        let (ids, vocab) = encode_texts(&["per head"], &tok_path).unwrap();
        assert_eq!(vocab, 1000);
        assert_eq!(ids[0].last(), Some(&999));
        assert_eq!(encode_file(&corpus, &tok_path, &mut |_| {}).unwrap().vocab, 1000);
    }
}
