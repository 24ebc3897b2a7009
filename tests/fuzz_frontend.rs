//! Property test: the front end returns a graph or a diagnostic for any input, random or
//! a mutation of a real model, and never panics or overflows the stack. 10,000 cases.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Fragments that are likely to reach deep into the parser and elaborator.
const TOKENS: &[&str] = &[
    "model",
    "fn",
    "use std",
    "param",
    "buffer",
    "input",
    "output",
    "for",
    "in",
    "if",
    "else",
    "..",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "|x|",
    ",",
    ":",
    "=",
    "==",
    "~",
    "@",
    "**",
    "-",
    "+",
    "*",
    "/",
    "%",
    "and",
    "not",
    "\n",
    ";",
    "x",
    "N",
    "B",
    "D",
    "heads",
    "dim",
    "0",
    "1",
    "-1",
    "2.5",
    "1e-8",
    "\"bnd,de->bne\"",
    "i32[B, N]",
    "[B, N, D]",
    "einsum",
    "cumsum",
    "reshape",
    "permute",
    "gather",
    "iota",
    "relu",
    "elu",
    "srms_norm",
    "norm_attention",
    "diag_attention",
    "glu",
    "lm_loss",
    "none",
    "true",
    "...",
    ":-1",
    "xavier",
    "@no_decay",
    "9223372036854775807",
];

fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = model_files().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    texts.push(std::fs::read_to_string(repo().join("models/std.tn")).unwrap());
    texts
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: usize },
    Duplicate { at: usize, len: usize },
    Swap { a: usize, b: usize },
    Byte { at: usize, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Insert { at, token }),
        (any::<usize>(), 1usize..200).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        (any::<usize>(), 32u8..127).prop_map(|(at, byte)| Mutation::Byte { at, byte }),
    ]
}

/// Apply a mutation on character boundaries.
fn apply(text: &str, m: &Mutation) -> String {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len().max(1);
    let mut out = chars.clone();
    match *m {
        Mutation::Delete { at, len } => {
            let a = at % n;
            out.drain(a..(a + len).min(chars.len()));
        }
        Mutation::Insert { at, token } => {
            let a = at % (chars.len() + 1);
            out.splice(a..a, format!(" {} ", TOKENS[token]).chars());
        }
        Mutation::Duplicate { at, len } => {
            let a = at % n;
            let piece: Vec<char> = chars[a.min(chars.len())..(a + len).min(chars.len())].to_vec();
            out.splice(a.min(chars.len())..a.min(chars.len()), piece);
        }
        Mutation::Swap { a, b } => {
            if !chars.is_empty() {
                out.swap(a % chars.len(), b % chars.len());
            }
        }
        Mutation::Byte { at, byte } => {
            if !chars.is_empty() {
                out[at % chars.len()] = byte as char;
            }
        }
    }
    out.into_iter().collect()
}

fn front_end_answers(text: &str, sets: &[String]) {
    // Any outcome is fine except a panic: `elaborate` reports a panicked worker as an
    // "internal error" diagnostic, which this test treats as a failure.
    let (sources, result) = elaborate_text("fuzz.tn", text, sets);
    if let Err(d) = result {
        assert!(!d.message.contains("internal error"), "{}\n--- input ---\n{text}", d.render(&sources));
        let _ = d.render(&sources);
    }
}

#[test]
fn front_end_never_panics() {
    let corpus = corpus();
    let tiny: Vec<String> = ["vocab=32", "dim=16", "heads=2", "layers=2"].iter().map(|s| s.to_string()).collect();
    let mut runner = TestRunner::new(Config { cases: 10_000, failure_persistence: None, ..Config::default() });
    let strategy = prop_oneof![
        // Mutations of real models (mostly close to valid, so they reach elaboration).
        3 => (0..corpus.len(), prop::collection::vec(mutation(), 1..4)).prop_map(move |(i, ms)| {
            ms.iter().fold(corpus[i].clone(), |t, m| apply(&t, m))
        }),
        // Random token soup.
        1 => prop::collection::vec(0..TOKENS.len(), 0..60)
            .prop_map(|ts| ts.iter().map(|&t| TOKENS[t]).collect::<Vec<_>>().join(" ")),
    ];
    runner
        .run(&strategy, |text| {
            front_end_answers(&text, &tiny);
            Ok(())
        })
        .unwrap();
}
