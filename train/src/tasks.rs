//! The synthetic tasks, one sequence (row) at a time.
//!
//! Token 0 is padding in both tasks. Each function returns the N tokens of a row and
//! its N-1 answer flags: flag n is true when the prediction at position n, of token
//! n + 1, is part of what the task asks the model to produce.

use crate::data::Rng;

/// Separator between the two halves of a copy sequence.
pub const COPY_SEPARATOR: i32 = 1;

/// Copy: `c1 … cL SEP c1 … cL 0 … 0` with content tokens `ci` uniform in `2..vocab` and
/// `L = len` (default `(N - 1) / 2`, the most that fits). The answers are the predictions
/// of the second half. A `len` that does not fit `N` is an error (as for MQAR), not a
/// shorter task.
pub fn copy(rng: &mut Rng, len: Option<usize>, vocab: usize, seq: usize) -> Result<(Vec<i32>, Vec<bool>), String> {
    if vocab < 3 {
        return Err(format!("copy: vocab={vocab} is too small; it needs at least 3 tokens"));
    }
    let fit = seq.saturating_sub(1) / 2;
    if let Some(len) = len.filter(|&len| len > fit) {
        return Err(format!(
            "copy: len={len} does not fit --seq {seq} (2·len + 1 = {} tokens); use --seq {} or len={fit}",
            2 * len + 1,
            2 * len + 1
        ));
    }
    let l = len.unwrap_or(fit);
    if l == 0 {
        return Err(format!("copy: sequence length {seq} is too short; it needs at least 3 tokens"));
    }
    let mut tokens = vec![0; seq];
    for i in 0..l {
        let c = 2 + rng.below(vocab - 2) as i32;
        tokens[i] = c;
        tokens[l + 1 + i] = c;
    }
    tokens[l] = COPY_SEPARATOR;
    let mut answers = vec![false; seq - 1];
    answers[l..2 * l].fill(true);
    Ok((tokens, answers))
}

/// How many keys MQAR has for a vocabulary: keys are `1..=keys`, values the rest of
/// `1..vocab`, so no token is both a key and a value.
pub fn mqar_key_count(vocab: usize) -> usize {
    vocab.saturating_sub(1) / 2
}

/// Multi-query associative recall (Zoology, arXiv 2312.04927):
/// `k1 v1 … kK vK 0 … 0 q1 a1 … qK aK` with K distinct keys, values uniform over the
/// value range, and the queries `qj` the same keys in a random order at the very end,
/// each followed by its value `aj`. The padding puts the queries far from their pairs,
/// so a short local attention window cannot answer them: recall must go through the
/// linear-attention state. The answers are the predictions of the `aj`.
pub fn mqar(rng: &mut Rng, pairs: usize, vocab: usize, seq: usize) -> Result<(Vec<i32>, Vec<bool>), String> {
    if pairs.saturating_mul(4) > seq {
        return Err(format!(
            "mqar: {pairs} pairs need a sequence of at least {} tokens (pairs and queries), found {seq}",
            pairs.saturating_mul(4)
        ));
    }
    let keys = mqar_key_count(vocab);
    if pairs > keys {
        return Err(format!("mqar: {pairs} distinct keys do not fit vocab={vocab}, which has {keys} keys"));
    }
    // K distinct keys: the first K of a partial Fisher-Yates shuffle of 1..=keys.
    let mut pool: Vec<i32> = (1..=keys as i32).collect();
    for i in 0..pairs {
        let j = i + rng.below(keys - i);
        pool.swap(i, j);
    }
    let values: Vec<i32> = (0..pairs).map(|_| (keys + 1 + rng.below(vocab - 1 - keys)) as i32).collect();
    let mut order: Vec<usize> = (0..pairs).collect();
    for i in (1..pairs).rev() {
        order.swap(i, rng.below(i + 1));
    }

    let mut tokens = vec![0; seq];
    let mut answers = vec![false; seq - 1];
    let queries = seq - 2 * pairs;
    for i in 0..pairs {
        tokens[2 * i] = pool[i];
        tokens[2 * i + 1] = values[i];
        let (q, p) = (queries + 2 * i, order[i]);
        tokens[q] = pool[p];
        tokens[q + 1] = values[p];
        answers[q] = true;
    }
    Ok((tokens, answers))
}

#[cfg(test)]
mod tests {
    use crate::data::DataSource;

    #[test]
    fn copy_rows_repeat_their_content_after_the_separator() {
        let b = DataSource::parse("copy:vocab=10").unwrap().train_batch(3, 0, 4, 12).unwrap();
        assert_eq!((b.tokens.len(), b.answers.len()), (48, 44));
        for row in 0..4 {
            let t = &b.tokens[row * 12..(row + 1) * 12];
            let a = &b.answers[row * 11..(row + 1) * 11];
            // L = (12 - 1) / 2 = 5: 5 content tokens, separator, 5 copies, one padding.
            assert!(t[..5].iter().all(|&c| (2..10).contains(&c)), "{t:?}");
            assert_eq!(t[5], 1);
            assert_eq!(t[6..11], t[..5]);
            assert_eq!(t[11], 0);
            let marked: Vec<usize> = (0..11).filter(|&n| a[n]).collect();
            assert_eq!(marked, vec![5, 6, 7, 8, 9]);
        }
    }

    #[test]
    fn copy_len_caps_the_content() {
        let b = DataSource::parse("copy:len=2,vocab=5").unwrap().train_batch(0, 0, 1, 8).unwrap();
        assert_eq!(b.tokens[2], 1);
        assert_eq!(b.tokens[3..5], b.tokens[..2]);
        assert_eq!(b.tokens[5..], [0, 0, 0]);
        assert_eq!(b.answers, [false, false, true, true, false, false, false]);
        let short = DataSource::parse("copy").unwrap().train_batch(0, 0, 1, 2).unwrap_err();
        assert!(short.contains("at least 3 tokens"), "{short}");
        // A length that does not fit is an error, not a shorter task.
        let long = DataSource::parse("copy:len=100").unwrap().train_batch(0, 0, 1, 64).unwrap_err();
        assert!(long.contains("len=100 does not fit --seq 64") && long.contains("--seq 201 or len=31"), "{long}");
    }

    #[test]
    fn mqar_queries_recall_the_values_of_their_keys() {
        let (batch, seq, pairs) = (8, 64, 8);
        let b = DataSource::parse("mqar").unwrap().train_batch(11, 5, batch, seq).unwrap();
        assert_eq!(b.answers.iter().filter(|&&a| a).count(), batch * pairs);
        let mut reordered = 0;
        for row in 0..batch {
            let t = &b.tokens[row * seq..(row + 1) * seq];
            let a = &b.answers[row * (seq - 1)..(row + 1) * (seq - 1)];
            let kv: Vec<(i32, i32)> = (0..pairs).map(|i| (t[2 * i], t[2 * i + 1])).collect();
            // Keys 1..=31 are distinct, values 32..=63.
            let mut keys: Vec<i32> = kv.iter().map(|p| p.0).collect();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), pairs);
            assert!(kv.iter().all(|&(k, v)| (1..=31).contains(&k) && (32..=63).contains(&v)), "{kv:?}");
            assert!(t[2 * pairs..seq - 2 * pairs].iter().all(|&x| x == 0));
            let queries: Vec<(i32, i32)> =
                (0..pairs).map(|j| (t[seq - 2 * pairs + 2 * j], t[seq - 2 * pairs + 2 * j + 1])).collect();
            let mut sorted_q = queries.clone();
            let mut sorted_kv = kv.clone();
            sorted_q.sort();
            sorted_kv.sort();
            assert_eq!(sorted_q, sorted_kv, "every query is followed by its key's value");
            reordered += usize::from(queries != kv);
            // Answers: the predictions made at the queries q1..qK (positions 48, 50, …, 62).
            let marked: Vec<usize> = (0..seq - 1).filter(|&n| a[n]).collect();
            assert_eq!(marked, (0..pairs).map(|j| seq - 2 * pairs + 2 * j).collect::<Vec<_>>());
        }
        assert!(reordered > 0, "queries come in a random order");
    }

    #[test]
    fn mqar_needs_room_for_pairs_and_queries() {
        let source = DataSource::parse("mqar:pairs=4,vocab=16").unwrap();
        assert!(source.train_batch(0, 0, 1, 16).is_ok());
        let err = source.train_batch(0, 0, 1, 15).unwrap_err();
        assert!(err.contains("at least 16 tokens"), "{err}");
    }
}
