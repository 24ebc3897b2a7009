//! `tnc tokenizer train FILES… --vocab N -o tokenizer.json`: a byte-level BPE trained on
//! text files, written as a Hugging Face `tokenizer.json` for `--tokenizer` (`tnc train`,
//! `tnc eval`). Any existing `tokenizer.json` works there too.

use crate::{fail, Failure};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE on text files (every byte is a token, so any text encodes).
    Train(TrainArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The text files to learn merges from.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Tokens in the vocabulary: 256 bytes, the special `<|endoftext|>`, then merges.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Where to write the tokenizer.
    #[arg(short = 'o', long = "out", default_value = "tokenizer.json")]
    pub out: PathBuf,
}

pub fn run(cmd: &TokenizerCommand) -> Result<(), Failure> {
    match cmd {
        TokenizerCommand::Train(a) => {
            let started = std::time::Instant::now();
            let vocab = tnc_train::tokenizer::train_bpe(&a.files, a.vocab, &a.out).map_err(fail)?;
            println!(
                "wrote {} ({vocab} tokens{}) in {:.1} s",
                a.out.display(),
                if vocab < a.vocab { ", fewer than --vocab: the text has no more merges" } else { "" },
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
