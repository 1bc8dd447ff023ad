//! Choosing the next token from logits: greedy, or llama.cpp's chain of repetition penalty,
//! top-k, temperature, top-p, then a seeded draw. The candidate buffer is allocated once.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. `temperature <= 0` means greedy.
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
}

/// Index of the largest value (the first one on ties), 0 for an empty slice.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// A seeded sampler.
pub struct Sampler {
    pub config: SamplerConfig,
    rng: StdRng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self {
            config,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token from one row of logits, given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let cfg = &self.config;
        let penalize = cfg.repeat_penalty != 1.0 && cfg.repeat_last_n > 0;
        if cfg.is_greedy() && !penalize {
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
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let cfg = SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
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
            let mut s = Sampler::new(cfg.clone());
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
        let mut s = Sampler::new(cfg);
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
        let mut s = Sampler::new(cfg);
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
    }
}
