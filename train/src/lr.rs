//! Learning-rate schedules.
//!
//! All schedules share a linear warm-up from 0: at step s < warmup the rate is
//! `base * s / warmup` (step 0 gets 0, as in Hugging Face's schedulers), which keeps the
//! first, largest gradients of a freshly initialized model from blowing up Adam's moments.
//! After warm-up:
//! - constant: `base`;
//! - cosine: half a cosine from `base` at the end of warm-up down to `0.1 * base` at
//!   `total_steps`, and `0.1 * base` after it;
//! - inverse-sqrt: `base * sqrt(warmup / step)` (fairseq), continuous with the warm-up;
//!   with no warm-up it is `base / sqrt(max(step, 1))`.

use std::fmt;

/// The floor of the cosine schedule, as a fraction of the base rate.
pub const COSINE_FLOOR: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    Cosine,
    InverseSqrt,
}

impl Schedule {
    /// Parses `constant`, `cosine` or `inverse-sqrt` (also `inverse_sqrt`, `rsqrt`).
    pub fn parse(name: &str) -> Result<Schedule, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            "inverse-sqrt" | "inverse_sqrt" | "rsqrt" => Ok(Schedule::InverseSqrt),
            _ => Err(format!("unknown learning-rate schedule `{name}`; valid: constant, cosine, inverse-sqrt")),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
            Schedule::InverseSqrt => "inverse-sqrt",
        })
    }
}

/// The learning rate for optimizer step `step` (counted from 0).
pub fn lr(schedule: Schedule, base_lr: f64, warmup: u64, total_steps: u64, step: u64) -> f64 {
    if step < warmup {
        return base_lr * step as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => base_lr,
        Schedule::Cosine => {
            let span = total_steps.saturating_sub(warmup);
            let progress = if span == 0 { 1.0 } else { ((step - warmup) as f64 / span as f64).min(1.0) };
            let floor = COSINE_FLOOR * base_lr;
            floor + (base_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        Schedule::InverseSqrt => base_lr * (warmup.max(1) as f64 / step.max(1) as f64).sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        for s in [Schedule::Constant, Schedule::Cosine, Schedule::InverseSqrt] {
            assert_eq!(lr(s, 1e-3, 10, 100, 0), 0.0);
            assert!(close(lr(s, 1e-3, 10, 100, 5), 5e-4));
            assert!(close(lr(s, 1e-3, 10, 100, 9), 9e-4));
            assert!(close(lr(s, 1e-3, 10, 100, 10), 1e-3), "{s} reaches the base rate after warm-up");
        }
    }

    #[test]
    fn constant_stays_at_base() {
        assert_eq!(lr(Schedule::Constant, 0.5, 0, 10, 0), 0.5);
        assert_eq!(lr(Schedule::Constant, 0.5, 0, 10, 1000), 0.5);
    }

    #[test]
    fn cosine_decays_to_a_tenth() {
        let c = |step| lr(Schedule::Cosine, 1.0, 10, 110, step);
        assert!(close(c(10), 1.0));
        // Halfway (step 60 of 10..110): 0.1 + 0.9 * 0.5 = 0.55.
        assert!(close(c(60), 0.55));
        // A quarter of the way: 0.1 + 0.9 * 0.5 * (1 + cos(pi/4)).
        assert!(close(c(35), 0.1 + 0.45 * (1.0 + std::f64::consts::FRAC_1_SQRT_2)));
        assert!(close(c(110), 0.1));
        assert!(close(c(500), 0.1));
        // No room after warm-up: the floor.
        assert!(close(lr(Schedule::Cosine, 1.0, 10, 5, 20), 0.1));
    }

    #[test]
    fn inverse_sqrt_is_fairseq() {
        let r = |warmup, step| lr(Schedule::InverseSqrt, 2.0, warmup, 0, step);
        assert!(close(r(100, 100), 2.0));
        assert!(close(r(100, 400), 1.0));
        assert!(close(r(100, 10_000), 0.2));
        assert!(close(r(0, 0), 2.0));
        assert!(close(r(0, 4), 1.0));
    }

    #[test]
    fn parses_names() {
        assert_eq!(Schedule::parse("cosine"), Ok(Schedule::Cosine));
        assert_eq!(Schedule::parse("Inverse-Sqrt"), Ok(Schedule::InverseSqrt));
        assert_eq!(Schedule::parse("rsqrt"), Ok(Schedule::InverseSqrt));
        assert_eq!(Schedule::parse("constant").unwrap().to_string(), "constant");
        assert!(Schedule::parse("linear").unwrap_err().contains("constant, cosine, inverse-sqrt"));
    }
}
