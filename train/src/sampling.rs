//! Choosing the next token from its logits: greedy (temperature 0), or a draw from the
//! softmax of `logits / temperature`, kept to the `top_k` most likely tokens and to the
//! smallest set whose probability reaches `top_p` (nucleus sampling). Draws come from the
//! counter-based generator (`tnc_runtime::rng`) at (seed, position), so a seed gives the
//! same text every time and on every machine.

/// How to choose.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token; ties to the lowest id).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens until their probability reaches p (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    /// Refuses settings that choose nothing or are not numbers.
    pub fn validated(self) -> Result<Sampling, String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("--temperature {} must be a number ≥ 0 (0 is greedy)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        Ok(self)
    }

    /// The token chosen at generation step `position` from `logits`.
    pub fn choose(&self, logits: &[f32], position: u64) -> Result<usize, String> {
        if logits.is_empty() || logits.iter().any(|x| x.is_nan()) {
            return Err(format!("the model's logits at step {position} are empty or NaN"));
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Most likely first; ties to the lowest id (stable sort).
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.temperature == 0.0 {
            return Ok(order[0]);
        }
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let top = logits[order[0]] as f64;
        let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - top) / self.temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: the shortest prefix whose probability reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        while kept < weights.len() && (kept == 0 || mass < self.top_p * total) {
            mass += weights[kept];
            kept += 1;
        }
        let u = tnc_runtime::rng::uniform(self.seed, SAMPLING_STREAM, position, 0) * mass;
        let mut acc = 0.0;
        for (k, w) in weights[..kept].iter().enumerate() {
            acc += w;
            if u < acc {
                return Ok(order[k]);
            }
        }
        Ok(order[kept - 1])
    }
}

/// The generator stream of sampling draws (distinct from dropout's and initialization's).
const SAMPLING_STREAM: u64 = 0x5a3f_1e00_7e57_0001;

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling { temperature, top_k, top_p, seed: 3 }.validated().unwrap()
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_ties_go_to_the_lowest_id() {
        assert_eq!(sampling(0.0, 0, 1.0).choose(&[0.1, 2.0, -1.0, 2.0], 0).unwrap(), 1);
    }

    #[test]
    fn draws_follow_the_softmax() {
        // Probabilities ∝ e^0, e^1, e^2 at temperature 1: 0.090, 0.245, 0.665.
        let logits = [0.0, 1.0, 2.0];
        let s = sampling(1.0, 0, 1.0);
        let mut counts = [0usize; 3];
        for p in 0..20_000 {
            counts[s.choose(&logits, p).unwrap()] += 1;
        }
        let want = [0.0900, 0.2447, 0.6652];
        for (c, w) in counts.iter().zip(want) {
            let f = *c as f64 / 20_000.0;
            assert!((f - w).abs() < 0.015, "{counts:?}");
        }
        // The same seed and position draw the same token.
        assert_eq!(s.choose(&logits, 7).unwrap(), s.choose(&logits, 7).unwrap());
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_most_likely() {
        let logits = [0.0, 1.0, 2.0, 3.0];
        for p in 0..500 {
            assert!(sampling(1.0, 2, 1.0).choose(&logits, p).unwrap() >= 2);
            // e^3 / Σ = 0.644: p = 0.5 keeps the top token alone.
            assert_eq!(sampling(1.0, 0, 0.5).choose(&logits, p).unwrap(), 3);
        }
        // p = 0.8 keeps the top two (0.644 + 0.237 ≥ 0.8): both appear.
        let picks: std::collections::BTreeSet<usize> =
            (0..500).map(|p| sampling(1.0, 0, 0.8).choose(&logits, p).unwrap()).collect();
        assert_eq!(picks.into_iter().collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn bad_settings_and_nan_logits_are_refused() {
        assert!(Sampling { temperature: -1.0, top_k: 0, top_p: 1.0, seed: 0 }.validated().is_err());
        assert!(Sampling { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 }.validated().is_err());
        assert!(sampling(1.0, 0, 1.0).choose(&[0.0, f32::NAN], 0).is_err());
    }
}
