//! Prompts in and generated text out, as a run's data spells tokens: the bytes of a text
//! (`text:PATH`, vocabulary 256), a tokenizer's subwords (`text:PATH?tokenizer=T`), or
//! bare token ids for the synthetic tasks (`copy`, `mqar`: a prompt such as `5 9 1`).
//!
//! Generated text is shown as it grows: [`TextCodec::printable`] gives the text of all
//! tokens so far up to the last complete character, so a character whose bytes span
//! several tokens is printed once it is whole.

use crate::data::TOKENIZER_KEY;
use std::path::Path;
use tokenizers::Tokenizer;

pub enum TextCodec {
    Bytes,
    Subwords(Box<Tokenizer>),
    Ids,
}

impl TextCodec {
    /// The codec of a run's data spec (as `run.json` records it).
    pub fn for_data(spec: &str) -> Result<TextCodec, String> {
        let spec = spec.trim();
        let Some(text) = spec.strip_prefix("text:") else {
            return Ok(TextCodec::Ids);
        };
        match text.rsplit_once(TOKENIZER_KEY) {
            Some((_, tok)) if !tok.is_empty() => {
                let t = Tokenizer::from_file(Path::new(tok)).map_err(|e| format!("tokenizer {tok}: {e}"))?;
                Ok(TextCodec::Subwords(Box::new(t)))
            }
            _ => Ok(TextCodec::Bytes),
        }
    }

    /// The prompt's tokens; an empty prompt or one that is not ids (for [`TextCodec::Ids`])
    /// is an error.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i32>, String> {
        let tokens = match self {
            TextCodec::Bytes => prompt.bytes().map(i32::from).collect(),
            TextCodec::Subwords(t) => t
                .encode(prompt, false)
                .map_err(|e| format!("tokenizing the prompt: {e}"))?
                .get_ids()
                .iter()
                .map(|&id| id as i32)
                .collect(),
            TextCodec::Ids => prompt
                .split_whitespace()
                .map(|w| w.parse::<i32>().map_err(|_| format!("the prompt of a task model is token ids, not `{w}`")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if tokens.is_empty() {
            return Err("the prompt is empty: give at least one token".into());
        }
        Ok(tokens)
    }

    /// The token that ends a text, where the tokenizer has one (`<|endoftext|>`, as
    /// `tnc tokenizer train` makes).
    pub fn end_of_text(&self) -> Option<usize> {
        match self {
            TextCodec::Subwords(t) => t.token_to_id("<|endoftext|>").map(|id| id as usize),
            _ => None,
        }
    }

    /// The text of `tokens`, up to the last complete character.
    pub fn printable(&self, tokens: &[i32]) -> Result<String, String> {
        match self {
            TextCodec::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.clamp(0, 255) as u8).collect();
                Ok(complete_utf8(&bytes))
            }
            TextCodec::Subwords(t) => {
                let ids: Vec<u32> = tokens.iter().map(|&t| t.max(0) as u32).collect();
                let text = t.decode(&ids, false).map_err(|e| format!("decoding: {e}"))?;
                // Byte-level BPE decodes an incomplete character as U+FFFD at the end.
                Ok(text.trim_end_matches('\u{FFFD}').to_string())
            }
            TextCodec::Ids => Ok(tokens.iter().map(|t| format!("{t} ")).collect()),
        }
    }
}

/// `bytes` as text, invalid sequences as U+FFFD, an incomplete character at the end held
/// back until its last byte arrives.
fn complete_utf8(bytes: &[u8]) -> String {
    let mut end = bytes.len();
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let length = match b {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        if length > back {
            end = bytes.len() - back;
        }
        break;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_hold_back_a_split_character() {
        let c = TextCodec::Bytes;
        let tokens = c.encode("né").unwrap();
        assert_eq!(tokens, vec![110, 195, 169]);
        assert_eq!(c.printable(&tokens[..2]).unwrap(), "n");
        assert_eq!(c.printable(&tokens).unwrap(), "né");
    }

    #[test]
    fn task_prompts_are_ids() {
        let c = TextCodec::for_data("copy:len=4").unwrap();
        assert_eq!(c.encode(" 5 9\t1 ").unwrap(), vec![5, 9, 1]);
        assert!(c.encode("5 x").unwrap_err().contains("token ids"));
        assert_eq!(c.printable(&[5, 9]).unwrap(), "5 9 ");
        assert!(TextCodec::Bytes.encode("").is_err());
    }
}
