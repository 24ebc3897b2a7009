//! ListOps (Nangia & Bowman 2018), as the Long-Range Arena publishes it: nested
//! `[MAX`, `[MIN`, `[MED` (median, rounded down) and `[SM` (sum modulo 10) expressions over
//! the digits 0–9, each closed by `]`; the label is the expression's value (10 classes).
//! Generated from the seed, nothing downloaded, following LRA's generator: below the
//! maximum depth a node is an operator with probability 1/4 (2 to `args` operands), else a
//! digit; the root is always an operator, and an expression longer than the sequence is
//! drawn again.
//!
//! Tokens: 0 padding (after the expression), 1 + d for digit d, then the four operators
//! and the closing bracket.

use crate::data::Rng;

/// Tokens of the task: padding, ten digits, four operators, `]`.
pub const VOCAB: usize = 16;
/// The classes: the values 0–9.
pub const CLASSES: usize = 10;

const DIGIT: i32 = 1;
const OPERATORS: [Op; 4] = [Op::Min, Op::Max, Op::Med, Op::Sum];
const CLOSE: i32 = 15;
/// LRA's probability that a node above the maximum depth is an operator.
const BRANCH_PERCENT: usize = 25;
/// Draws of an expression before giving up on one that fits.
const ATTEMPTS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Min,
    Max,
    Med,
    Sum,
}

impl Op {
    fn token(self) -> i32 {
        11 + OPERATORS.iter().position(|o| *o == self).expect("an operator") as i32
    }

    fn apply(self, values: &mut [u8]) -> u8 {
        match self {
            Op::Min => *values.iter().min().expect("at least two operands"),
            Op::Max => *values.iter().max().expect("at least two operands"),
            Op::Sum => (values.iter().map(|&v| v as u32).sum::<u32>() % 10) as u8,
            Op::Med => {
                // numpy's median, truncated as LRA's `int(np.median(x))` does.
                values.sort_unstable();
                let k = values.len();
                ((values[(k - 1) / 2] as u32 + values[k / 2] as u32) / 2) as u8
            }
        }
    }
}

/// A node's tokens appended to `out`; returns its value. `None` once `out` outgrows `budget`.
fn node(rng: &mut Rng, depth: usize, max_depth: usize, args: usize, out: &mut Vec<i32>, budget: usize) -> Option<u8> {
    if out.len() >= budget {
        return None;
    }
    let branch = depth == 0 || (depth < max_depth && rng.below(100) < BRANCH_PERCENT);
    if !branch {
        let d = rng.below(10) as u8;
        out.push(DIGIT + d as i32);
        return Some(d);
    }
    let op = OPERATORS[rng.below(OPERATORS.len())];
    out.push(op.token());
    let count = 2 + rng.below(args - 1);
    let mut values = Vec::new(); // `count` comes from the user's `args`: no reservation
    for _ in 0..count {
        values.push(node(rng, depth + 1, max_depth, args, out, budget)?);
    }
    out.push(CLOSE);
    (out.len() <= budget).then(|| op.apply(&mut values))
}

/// One row: the expression's tokens padded to `seq`, and its value.
pub fn row(rng: &mut Rng, depth: usize, args: usize, seq: usize) -> Result<(Vec<i32>, i32), String> {
    if depth == 0 || args < 2 {
        return Err(format!("listops: depth={depth}, args={args}: depth must be ≥ 1 and args ≥ 2"));
    }
    if seq < 4 {
        return Err(format!("listops: --seq {seq} is too short; the smallest expression, `[MAX 1 2 ]`, has 4 tokens"));
    }
    let mut tokens = Vec::with_capacity(seq);
    for _ in 0..ATTEMPTS {
        tokens.clear();
        if let Some(value) = node(rng, 0, depth, args, &mut tokens, seq) {
            tokens.resize(seq, 0);
            return Ok((tokens, value as i32));
        }
    }
    Err(format!(
        "listops: no expression of depth ≤ {depth} with ≤ {args} operands fit --seq {seq} in {ATTEMPTS} draws; \
         use a longer --seq or a smaller depth/args"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expression of `tokens` as text (`[MAX 2 9 [MIN 4 7 ] 0 ]`), padding left out.
    fn to_text(tokens: &[i32]) -> String {
        let word = |t: i32| match t {
            1..=10 => (t - DIGIT).to_string(),
            11..=14 => ["[MIN", "[MAX", "[MED", "[SM"][(t - 11) as usize].to_string(),
            CLOSE => "]".to_string(),
            _ => "?".to_string(),
        };
        tokens.iter().filter(|&&t| t != 0).map(|&t| word(t)).collect::<Vec<_>>().join(" ")
    }

    /// Evaluates the text form independently of the generator (a stack machine).
    fn evaluate(text: &str) -> u8 {
        let mut stack: Vec<(Option<&str>, Vec<u8>)> = vec![(None, Vec::new())];
        for w in text.split(' ') {
            if let Some(op) = w.strip_prefix('[') {
                stack.push((Some(op), Vec::new()));
            } else if w == "]" {
                let (op, mut vals) = stack.pop().unwrap();
                vals.sort();
                let v = match op.unwrap() {
                    "MIN" => vals[0],
                    "MAX" => *vals.last().unwrap(),
                    "SM" => (vals.iter().map(|&x| x as u32).sum::<u32>() % 10) as u8,
                    _ => ((vals[(vals.len() - 1) / 2] as u32 + vals[vals.len() / 2] as u32) / 2) as u8,
                };
                stack.last_mut().unwrap().1.push(v);
            } else {
                stack.last_mut().unwrap().1.push(w.parse().unwrap());
            }
        }
        stack[0].1[0]
    }

    #[test]
    fn labels_are_the_values_of_the_expressions() {
        let mut depths = [0usize; 4];
        for r in 0..500 {
            let mut rng = Rng::new(7, 1, 0, r);
            let (tokens, label) = row(&mut rng, 3, 5, 128).unwrap();
            assert_eq!(tokens.len(), 128);
            let text = to_text(&tokens);
            assert_eq!(evaluate(&text) as i32, label, "{text}");
            let depth = text.chars().scan(0i32, |d, c| {
                *d += (c == '[') as i32 - (c == ']') as i32;
                Some(*d)
            });
            depths[depth.max().unwrap() as usize] += 1;
            // Padding only after the expression.
            let used = tokens.iter().position(|&t| t == 0).unwrap_or(128);
            assert!(tokens[used..].iter().all(|&t| t == 0));
        }
        // Nested expressions occur, and none deeper than asked.
        assert_eq!(depths[0], 0);
        assert!(depths[2] > 50 && depths[3] > 5, "{depths:?}");
    }

    #[test]
    fn medians_round_down_and_sums_wrap() {
        assert_eq!(Op::Med.apply(&mut [3, 8]), 5);
        assert_eq!(Op::Med.apply(&mut [2, 9]), 5);
        assert_eq!(Op::Med.apply(&mut [9, 1, 4]), 4);
        assert_eq!(Op::Sum.apply(&mut [9, 8, 7]), 4);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut rng = Rng::new(0, 0, 0, 0);
        assert!(row(&mut rng, 0, 5, 64).unwrap_err().contains("depth must be"));
        assert!(row(&mut rng, 3, 1, 64).unwrap_err().contains("args ≥ 2"));
        assert!(row(&mut rng, 3, 5, 3).unwrap_err().contains("too short"));
    }
}
