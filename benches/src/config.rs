//! What to run: scenarios (prompt length, tokens to generate, context depth) and the suite's
//! settings (iterations, warm-up, backends, model, batch), validated once here.

use std::path::PathBuf;

use rocforge_runtime::BackendKind;

use crate::error::{BenchError, Result};

/// One workload: `depth` tokens already in the cache, then a prompt of `prompt_tokens`, then
/// `gen_tokens` generated tokens (the first from the prompt's logits when there is a prompt).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scenario {
    pub name: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Tokens in the KV cache before the prompt (llama-bench's `-d`).
    #[serde(default)]
    pub depth: usize,
}

impl Scenario {
    pub fn new(name: &str, prompt_tokens: usize, gen_tokens: usize, depth: usize) -> Self {
        Self {
            name: name.to_string(),
            prompt_tokens,
            gen_tokens,
            depth,
        }
    }
    /// A chat turn: prompt 128, generate 50.
    pub fn chat() -> Self {
        Self::new("chat", 128, 50, 0)
    }
    /// Summarization: prompt 512, generate 100.
    pub fn summarization() -> Self {
        Self::new("summarization", 512, 100, 0)
    }
    /// Long context: prompt 2048, generate 100.
    pub fn long_context() -> Self {
        Self::new("long-context", 2048, 100, 0)
    }
    /// llama-bench's prompt processing test, `ppN`.
    pub fn pp(n: usize) -> Self {
        Self::new(&format!("pp{n}"), n, 0, 0)
    }
    /// llama-bench's generation test, `tgN`.
    pub fn tg(n: usize) -> Self {
        Self::new(&format!("tg{n}"), 0, n, 0)
    }
    /// The same test after `depth` tokens are in the cache (`tg128 @ d2048`).
    pub fn at_depth(mut self, depth: usize) -> Self {
        self.depth = depth;
        self.name = format!("{} @ d{depth}", self.name);
        self
    }

    /// Parses `chat`, `summarization`, `long-context`, `ppN`, `tgN`, `ppN+tgM`, each with an
    /// optional `@dN` (`tg128@d2048`).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            BenchError::InvalidArgument(format!(
                "unknown scenario `{text}` (choose chat, summarization, long-context, ppN, tgN, ppN+tgM, each optionally @dN)"
            ))
        };
        let compact: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        let (base, depth) = match compact.split_once('@') {
            Some((b, d)) => (
                b.to_string(),
                Some(
                    d.strip_prefix('d')
                        .and_then(|d| d.parse::<usize>().ok())
                        .ok_or_else(bad)?,
                ),
            ),
            None => (compact, None),
        };
        let num = |s: &str, prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        let sc = match base.as_str() {
            "chat" => Self::chat(),
            "summarization" => Self::summarization(),
            "long-context" | "long_context" => Self::long_context(),
            b => match b.split_once('+') {
                Some((p, g)) => {
                    let (p, g) = (num(p, "pp").ok_or_else(bad)?, num(g, "tg").ok_or_else(bad)?);
                    Self::new(&format!("pp{p}+tg{g}"), p, g, 0)
                }
                None => match (num(b, "pp"), num(b, "tg")) {
                    (Some(n), _) => Self::pp(n),
                    (_, Some(n)) => Self::tg(n),
                    _ => return Err(bad()),
                },
            },
        };
        Ok(match depth {
            Some(d) if d > 0 => sc.at_depth(d),
            _ => sc,
        })
    }

    /// KV-cache positions the scenario needs.
    pub fn context_needed(&self) -> usize {
        self.depth + self.prompt_tokens + self.gen_tokens
    }

    /// Decode steps timed: every generated token but the first when a prompt produces it.
    pub fn decode_steps(&self) -> usize {
        if self.prompt_tokens > 0 {
            self.gen_tokens.saturating_sub(1)
        } else {
            self.gen_tokens
        }
    }

    /// The scenario's phases as llama-bench test names (`pp512`, `tg128 @ d2048`).
    pub fn test_names(&self) -> (Option<String>, Option<String>) {
        let at = if self.depth > 0 {
            format!(" @ d{}", self.depth)
        } else {
            String::new()
        };
        let pp = (self.prompt_tokens > 0).then(|| format!("pp{}{at}", self.prompt_tokens));
        let tg = (self.gen_tokens > 0).then(|| format!("tg{}{at}", self.gen_tokens));
        (pp, tg)
    }
}

/// The suite's settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The model file.
    pub model: PathBuf,
    /// Backends, run one after another for side-by-side tables.
    pub backends: Vec<BackendKind>,
    pub scenarios: Vec<Scenario>,
    /// Measured iterations per scenario.
    pub iterations: usize,
    /// Iterations run first and discarded (caches, JIT compilation, clocks).
    pub warmup: usize,
    /// Most prompt tokens per forward call (prefill chunk).
    pub batch: usize,
    /// Profile one prefill and one decode step per op family.
    pub profile: bool,
    /// Whether this is a `--quick` run.
    pub quick: bool,
    /// Levels of the concurrency sweep (`--concurrency 1,8,32,64`): at each, that many
    /// requests of `sweep` run together through the engine. Empty: no sweep.
    pub concurrency: Vec<usize>,
    /// Each request of the sweep: llama-batched-bench's `-npp 128 -ntg 128` (32 + 32 quick).
    pub sweep: Scenario,
}

/// Most requests one sweep level runs together.
pub const MAX_CONCURRENCY: usize = 4096;

/// Parses a concurrency list (`1,8,32,64`): each level in 1..=[`MAX_CONCURRENCY`], no repeats.
pub fn parse_concurrency(items: &[String]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let level = item
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
            .ok_or_else(|| {
                BenchError::InvalidArgument(format!(
                    "--concurrency `{item}`: each level must be a whole number from 1 to {MAX_CONCURRENCY}"
                ))
            })?;
        if !out.contains(&level) {
            out.push(level);
        }
    }
    Ok(out)
}

impl BenchConfig {
    /// The full suite: the three workloads, `pp512`, `tg128` and `tg128 @ d2048`, 5 iterations
    /// after 1 warm-up.
    pub fn standard(model: PathBuf, backends: Vec<BackendKind>) -> Self {
        Self {
            model,
            backends,
            scenarios: vec![
                Scenario::chat(),
                Scenario::summarization(),
                Scenario::long_context(),
                Scenario::pp(512),
                Scenario::tg(128),
                Scenario::tg(128).at_depth(2048),
            ],
            iterations: 5,
            warmup: 1,
            batch: 512,
            profile: true,
            quick: false,
            concurrency: Vec::new(),
            sweep: Scenario::new("pp128+tg128", 128, 128, 0),
        }
    }

    /// A short run that finishes in about two minutes on a 2-core CPU: chat, summarization,
    /// `pp512`, `tg128` and `tg128 @ d1024` (long context is left out: its 2048-token prompt
    /// alone takes most of a minute there), 2 iterations after 1 warm-up.
    pub fn quick(model: PathBuf, backends: Vec<BackendKind>) -> Self {
        Self {
            scenarios: vec![
                Scenario::chat(),
                Scenario::summarization(),
                Scenario::pp(512),
                Scenario::tg(128),
                Scenario::tg(128).at_depth(1024),
            ],
            iterations: 2,
            warmup: 1,
            quick: true,
            sweep: Scenario::new("pp32+tg32", 32, 32, 0),
            ..Self::standard(model, backends)
        }
    }

    /// Prompt length of the per-op profile: the longest prompt, at most 512 (128 when quick).
    pub fn profile_tokens(&self) -> usize {
        let longest = self
            .scenarios
            .iter()
            .map(|s| s.prompt_tokens)
            .max()
            .unwrap_or(1);
        longest.clamp(1, if self.quick { 128 } else { 512 })
    }

    /// Checks the settings once, before anything runs.
    pub fn validate(&self) -> Result<()> {
        if !self.model.exists() {
            return Err(BenchError::MissingModel(self.model.clone()));
        }
        if self.backends.is_empty() || (self.scenarios.is_empty() && self.concurrency.is_empty()) {
            return Err(BenchError::InvalidArgument(
                "at least one backend and one scenario (or --concurrency level) are needed".into(),
            ));
        }
        if !self.concurrency.is_empty() && (self.sweep.prompt_tokens == 0 || self.sweep.depth > 0) {
            return Err(BenchError::InvalidArgument(format!(
                "the sweep's requests need a prompt and no depth (ppN+tgM), not `{}`",
                self.sweep.name
            )));
        }
        if self.iterations == 0 || self.batch == 0 {
            return Err(BenchError::InvalidArgument(
                "iterations and batch must be at least 1".into(),
            ));
        }
        if let Some(b) = self.backends.iter().find(|b| !b.compiled()) {
            return Err(BenchError::InvalidArgument(format!(
                "this build has no `{b}` backend; rebuild the suite with `--features {b}`"
            )));
        }
        Ok(())
    }

    /// KV-cache capacity for the largest scenario (per sequence, the sweep's requests too).
    pub fn ctx(&self) -> usize {
        let sweep = (!self.concurrency.is_empty()).then(|| self.sweep.context_needed());
        self.scenarios
            .iter()
            .map(Scenario::context_needed)
            .chain(sweep)
            .max()
            .unwrap_or(1)
    }
}

/// Parses a backend list (`cpu,cuda`).
pub fn parse_backends(items: &[String]) -> Result<Vec<BackendKind>> {
    let mut out = Vec::new();
    for item in items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let kind: BackendKind = item
            .parse()
            .map_err(|e: rocforge_runtime::Error| BenchError::InvalidArgument(e.to_string()))?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        out.push(BackendKind::Auto);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scenarios() {
        assert_eq!(
            Scenario::parse("tg128@d2048").unwrap(),
            Scenario::tg(128).at_depth(2048)
        );
        assert_eq!(
            Scenario::parse("tg128 @ d2048").unwrap().name,
            "tg128 @ d2048"
        );
        assert_eq!(Scenario::parse("pp512").unwrap(), Scenario::pp(512));
        assert_eq!(Scenario::parse("chat").unwrap(), Scenario::chat());
        assert_eq!(Scenario::parse("pp64+tg16").unwrap().context_needed(), 80);
        assert!(Scenario::parse("pp").is_err());
        assert!(Scenario::parse("tg128@2048").is_err());
        assert_eq!(Scenario::chat().decode_steps(), 49);
        assert_eq!(Scenario::tg(128).decode_steps(), 128);
        assert_eq!(
            Scenario::tg(128).at_depth(2048).test_names(),
            (None, Some("tg128 @ d2048".into()))
        );
    }

    #[test]
    fn parses_concurrency_levels() {
        assert_eq!(
            parse_concurrency(&["1,8".into(), "32, 64,8".into()]).unwrap(),
            vec![1, 8, 32, 64]
        );
        assert!(parse_concurrency(&[]).unwrap().is_empty());
        for bad in ["0", "x", "-1", "4097"] {
            let e = parse_concurrency(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("--concurrency") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn rejects_unknown_backends() {
        assert!(parse_backends(&["cpu,nope".into()])
            .unwrap_err()
            .to_string()
            .contains("unknown backend `nope`"));
        assert_eq!(parse_backends(&[]).unwrap(), vec![BackendKind::Auto]);
    }
}
