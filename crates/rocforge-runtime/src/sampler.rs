//! Choosing the next token from logits: greedy, or llama.cpp's chain of repetition penalty,
//! top-k, temperature, top-p, then a seeded draw. The candidate buffer is allocated once.
//!
//! Settings are validated by [`Sampler::new`]; logits are not trusted (a broken model can
//! produce NaN or infinities): NaN is never drawn while the row holds another value, and
//! infinities count as the largest finite values, so every draw returns an id inside the row.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::limits::out_of_range;

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerConfig {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks every setting: temperature finite and >= 0, top_p in 0..=1, repeat_penalty
    /// finite and > 0. top_k, repeat_last_n and seed take any value (a top_k above the
    /// vocabulary keeps every token).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(out_of_range(
                "temperature",
                self.temperature,
                "a finite number >= 0; 0 is greedy",
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(out_of_range(
                "top_p",
                self.top_p,
                "0 to 1; 1 keeps every token",
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(out_of_range(
                "repeat_penalty",
                self.repeat_penalty,
                "a finite number > 0; 1 is off",
            ));
        }
        Ok(())
    }
}

/// Whether logit `v` beats `best`: NaN never beats anything, anything else beats NaN.
fn beats(v: f32, best: f32) -> bool {
    !v.is_nan() && (best.is_nan() || v > best)
}

/// Index of the largest value (the first one on ties; NaN only if every value is NaN), 0 for
/// an empty slice.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if beats(v, logits[best]) {
            best = i;
        }
    }
    best
}

/// A seeded sampler.
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `config`, which must pass [`SamplerConfig::validate`].
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self {
            config,
            rng,
            candidates: Vec::new(),
        })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Whether the repetition penalty changes anything.
    pub fn penalizes(&self) -> bool {
        self.config.repeat_penalty != 1.0 && self.config.repeat_last_n > 0
    }

    /// Picks the next token from one row of logits, given the tokens so far. The id is
    /// always inside the row (0 for an empty row).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let penalize = self.penalizes();
        let cfg = &self.config;
        if logits.is_empty() || (cfg.is_greedy() && !penalize) {
            return argmax(logits) as u32;
        }
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        if penalize {
            let recent = &history[history.len().saturating_sub(cfg.repeat_last_n)..];
            for &t in recent {
                if let Some(c) = self.candidates.get_mut(t as usize) {
                    c.0 = if c.0 > 0.0 {
                        c.0 / cfg.repeat_penalty
                    } else {
                        c.0 * cfg.repeat_penalty
                    };
                }
            }
        }
        // NaN is never drawn, and finite values only from here: the softmax below then never
        // divides inf by inf.
        self.candidates.retain(|c| !c.0.is_nan());
        if self.candidates.is_empty() {
            return 0;
        }
        for c in self.candidates.iter_mut() {
            c.0 = c.0.clamp(f32::MIN, f32::MAX);
        }
        if cfg.is_greedy() {
            let best = self.candidates.iter().enumerate().fold(0, |b, (i, c)| {
                if c.0 > self.candidates[b].0 {
                    i
                } else {
                    b
                }
            });
            return self.candidates[best].1;
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = if cfg.top_k == 0 {
            self.candidates.len()
        } else {
            cfg.top_k.min(self.candidates.len())
        };
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        // softmax with temperature
        let max = self.candidates[0].0;
        let mut sum = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.0 = ((c.0 - max) / cfg.temperature).exp();
            sum += c.0;
        }
        for c in self.candidates.iter_mut() {
            c.0 /= sum;
        }
        // top-p: keep the smallest prefix reaching p
        if cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                acc += c.0;
                if acc >= cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep.max(1));
        }
        let total: f32 = self.candidates.iter().map(|c| c.0).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for c in &self.candidates {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.candidates.last().map_or(0, |c| c.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let cfg = SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_spread_over_candidates() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let logits = [1.0, 1.0, 1.0, 1.0];
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        for t in 0..4 {
            assert!(
                a.contains(&t),
                "token {t} never drawn from a uniform distribution"
            );
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[10.0, 0.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let cfg = SamplerConfig {
            repeat_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn bad_settings_are_refused_at_construction() {
        let bad = [
            SamplerConfig {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                temperature: f32::INFINITY,
                ..Default::default()
            },
            SamplerConfig {
                temperature: -0.5,
                ..Default::default()
            },
            SamplerConfig {
                top_p: 1.0001,
                ..Default::default()
            },
            SamplerConfig {
                top_p: -0.0001,
                ..Default::default()
            },
            SamplerConfig {
                top_p: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: -1.0,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: f32::INFINITY,
                ..Default::default()
            },
        ];
        for cfg in bad {
            let err = Sampler::new(cfg.clone())
                .err()
                .unwrap_or_else(|| panic!("{cfg:?} accepted"));
            assert!(matches!(err, crate::Error::OutOfRange { .. }), "{err}");
        }
    }

    #[test]
    fn nan_never_wins_and_infinities_stay_sampleable() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[]), 0);
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..20 {
            assert_eq!(
                s.sample(&[f32::NAN, f32::INFINITY, 0.0, f32::NEG_INFINITY], &[]),
                1
            );
        }
        assert_eq!(s.sample(&[], &[]), 0);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Any f32 logit, the special values included.
        fn logit() -> impl Strategy<Value = f32> {
            prop_oneof![
                4 => -30.0f32..30.0,
                1 => Just(f32::NAN),
                1 => Just(f32::INFINITY),
                1 => Just(f32::NEG_INFINITY),
                1 => Just(f32::MAX),
                1 => Just(f32::MIN),
                1 => any::<f32>(),
            ]
        }

        /// Every setting at its edges or inside its range.
        fn config() -> impl Strategy<Value = SamplerConfig> {
            let temperature = prop_oneof![
                Just(0.0f32),
                Just(f32::MIN_POSITIVE),
                Just(1e-30),
                Just(1.0),
                Just(f32::MAX),
                0.0f32..10.0
            ];
            let top_p = prop_oneof![
                Just(0.0f32),
                Just(1.0),
                Just(f32::MIN_POSITIVE),
                0.0f32..=1.0
            ];
            let top_k = prop_oneof![Just(0usize), Just(1), Just(usize::MAX), 0usize..100];
            let penalty = prop_oneof![
                Just(1.0f32),
                Just(f32::MIN_POSITIVE),
                Just(f32::MAX),
                0.01f32..10.0
            ];
            let last_n = prop_oneof![Just(0usize), Just(usize::MAX), 0usize..100];
            (temperature, top_p, top_k, penalty, last_n, any::<u64>()).prop_map(
                |(temperature, top_p, top_k, repeat_penalty, repeat_last_n, seed)| SamplerConfig {
                    temperature,
                    top_k,
                    top_p,
                    repeat_penalty,
                    repeat_last_n,
                    seed,
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any valid config on any logits returns an id inside the row, the same one for
            /// the same seed, and a finite logit whenever the row holds one.
            #[test]
            fn draws_stay_in_the_row(cfg in config(), logits in prop::collection::vec(logit(), 1..64), history in prop::collection::vec(0u32..80, 0..16)) {
                let mut a = Sampler::new(cfg.clone()).unwrap();
                let mut b = Sampler::new(cfg.clone()).unwrap();
                for _ in 0..4 {
                    let id = a.sample(&logits, &history);
                    prop_assert!((id as usize) < logits.len());
                    prop_assert_eq!(id, b.sample(&logits, &history));
                    if logits.iter().any(|l| !l.is_nan()) {
                        prop_assert!(!logits[id as usize].is_nan(), "picked NaN at {}", id);
                    }
                }
            }

            /// top_k = 1 (or greedy without penalty) is the argmax whatever the temperature.
            #[test]
            fn top_k_one_is_argmax(cfg in config(), logits in prop::collection::vec(logit(), 1..64)) {
                let cfg = SamplerConfig { top_k: 1, repeat_penalty: 1.0, ..cfg };
                let mut s = Sampler::new(cfg).unwrap();
                let best = argmax(&logits);
                let id = s.sample(&logits, &[]) as usize;
                prop_assert!(id == best || logits[id] == logits[best] || logits[id].clamp(f32::MIN, f32::MAX) == logits[best].clamp(f32::MIN, f32::MAX), "{} vs {}", id, best);
            }

            /// The draw is one of the top_k largest logits.
            #[test]
            fn draw_is_within_top_k(cfg in config(), logits in prop::collection::vec(-30.0f32..30.0, 1..64), k in 1usize..8) {
                let cfg = SamplerConfig { top_k: k, repeat_penalty: 1.0, ..cfg };
                let mut s = Sampler::new(cfg).unwrap();
                let id = s.sample(&logits, &[]) as usize;
                let larger = logits.iter().filter(|&&l| l > logits[id]).count();
                prop_assert!(larger < k, "{} logits beat the draw with top_k {}", larger, k);
            }

            /// Out-of-range values of each checked setting are refused.
            #[test]
            fn invalid_values_are_refused(t in prop_oneof![-1e30f32..-1e-30, Just(f32::NAN), Just(f32::INFINITY)], p in prop_oneof![1.0001f32..1e30, -1e30f32..-1e-30, Just(f32::NAN)], r in prop_oneof![-1e30f32..=0.0, Just(f32::NAN), Just(f32::INFINITY)]) {
                let refused = |cfg: SamplerConfig| Sampler::new(cfg).is_err();
                prop_assert!(refused(SamplerConfig { temperature: t, ..Default::default() }), "temperature {}", t);
                prop_assert!(refused(SamplerConfig { top_p: p, ..Default::default() }), "top_p {}", p);
                prop_assert!(refused(SamplerConfig { repeat_penalty: r, ..Default::default() }), "repeat_penalty {}", r);
            }
        }
    }
}
