//! Limits on the sizes that callers choose (context, batch, tokens to generate) and the checks
//! that keep them from overflowing an allocation size or asking for more memory than the
//! machine has. Checked once where the values enter: [`Session::new`](crate::Session::new) for
//! [`BackendOptions`], [`Sampler::new`](crate::Sampler::new) for sampling settings; backends
//! call [`kv_cache_bytes`] and [`largest_ctx_within`] for their own memory checks.

use crate::backend::{BackendKind, BackendOptions};
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Largest KV-cache capacity in tokens (the model loader's bound for `context_length`).
pub const MAX_CTX: usize = 1 << 20;
/// Largest number of tokens in one forward call.
pub const MAX_BATCH: usize = 1 << 16;
/// GPU kernels address one layer's K or V cache with u32 element indices.
pub const MAX_KV_ELEMENTS_PER_LAYER: u64 = u32::MAX as u64;

/// An [`Error::OutOfRange`] for `name = value`, with the allowed range in words.
pub fn out_of_range(name: &str, value: impl std::fmt::Display, allowed: &str) -> Error {
    Error::OutOfRange {
        name: name.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

/// Checks the sizes alone (no model): `ctx` in 1..=[`MAX_CTX`], `max_batch` in 1..=[`MAX_BATCH`].
pub fn check_sizes(opts: &BackendOptions) -> Result<()> {
    if !(1..=MAX_CTX).contains(&opts.ctx) {
        return Err(out_of_range("ctx", opts.ctx, &format!("1 to {MAX_CTX}")));
    }
    if !(1..=MAX_BATCH).contains(&opts.max_batch) {
        return Err(out_of_range(
            "batch",
            opts.max_batch,
            &format!("1 to {MAX_BATCH}"),
        ));
    }
    Ok(())
}

/// Bytes of the K and V caches of all layers for `ctx` tokens at `bytes_per_element`, or
/// `None` if that overflows u64.
pub fn kv_cache_bytes(config: &ModelConfig, ctx: usize, bytes_per_element: u64) -> Option<u64> {
    (ctx as u64)
        .checked_mul(config.kv_dim() as u64)?
        .checked_mul(config.n_layer as u64)?
        .checked_mul(2 * bytes_per_element)
}

/// Bytes of the CPU backend's activations for batches of `batch` tokens (f32), or `None` on
/// overflow: the rows of x, xn, proj (n_embd), q, att (q_dim), k, v (kv_dim), gate, up (n_ff),
/// and the logits of every row when all logits are asked for.
pub fn cpu_scratch_bytes(config: &ModelConfig, batch: usize) -> Option<u64> {
    let c = config;
    let row = (3 * c.n_embd as u64)
        .checked_add(2 * c.q_dim() as u64)?
        .checked_add(2 * c.kv_dim() as u64)?
        .checked_add(2 * c.n_ff as u64)?
        .checked_add(c.n_vocab as u64)?;
    row.checked_mul(batch as u64)?.checked_mul(4)
}

/// The largest context whose KV cache, plus `fixed` bytes, fits in `budget` bytes.
pub fn largest_ctx_within(
    config: &ModelConfig,
    budget: u64,
    fixed: u64,
    bytes_per_element: u64,
) -> usize {
    let per_token = kv_cache_bytes(config, 1, bytes_per_element)
        .unwrap_or(u64::MAX)
        .max(1);
    (budget.saturating_sub(fixed) / per_token).min(MAX_CTX as u64) as usize
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable`), if known.
pub fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Checks `opts` against the model before a backend allocates anything: sizes in range,
/// no overflow of the KV cache size or of the kernels' u32 indices, and, for the CPU
/// backend, KV cache plus scratch within the host's available memory (GPU backends compare
/// with the device's free memory themselves).
pub fn check_backend_options(
    config: &ModelConfig,
    kind: BackendKind,
    opts: &BackendOptions,
) -> Result<()> {
    check_sizes(opts)?;
    let per_layer = (opts.ctx as u64).checked_mul(config.kv_dim() as u64);
    if per_layer.is_none_or(|e| e > MAX_KV_ELEMENTS_PER_LAYER) {
        let largest = MAX_KV_ELEMENTS_PER_LAYER / config.kv_dim().max(1) as u64;
        return Err(out_of_range(
            "ctx",
            opts.ctx,
            &format!(
                "1 to {largest} for this model: ctx × KV width {} must stay below 2^32",
                config.kv_dim()
            ),
        ));
    }
    let on_cpu = kind == BackendKind::Cpu
        || (kind == BackendKind::Auto
            && !cfg!(any(feature = "cuda", feature = "hip", feature = "wgpu")));
    if !on_cpu {
        return Ok(());
    }
    let batch = opts.max_batch.min(opts.ctx);
    let kv = kv_cache_bytes(config, opts.ctx, 4);
    let scratch = cpu_scratch_bytes(config, batch);
    let needed = kv.zip(scratch).and_then(|(k, s)| k.checked_add(s));
    if let (Some(avail), Some(scratch)) = (host_memory_available(), scratch) {
        if needed.is_none_or(|n| n > avail) {
            let largest = largest_ctx_within(config, avail, scratch, 4);
            return Err(Error::Backend {
                backend: "cpu".into(),
                problem: format!(
                    "a KV cache of {} tokens needs {} (plus {} of activations), but only {} of memory is available; the largest --ctx that fits is {largest}",
                    opts.ctx,
                    kv.map_or("more than 16 EiB".into(), gib),
                    gib(scratch),
                    gib(avail),
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n_layer: usize, n_head_kv: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            n_layer,
            n_embd: 64,
            n_head: n_head_kv,
            n_head_kv,
            head_dim,
            n_ff: 128,
            n_vocab: 320,
            n_ctx_train: 2048,
            rope_dim: head_dim,
            rope_base: 10000.0,
            rms_eps: 1e-5,
        }
    }

    #[track_caller]
    fn out_of_range_named(r: Result<()>, name: &str) {
        match r {
            Err(Error::OutOfRange { name: n, .. }) => assert_eq!(n, name),
            other => panic!("expected {name} out of range, got {other:?}"),
        }
    }

    #[test]
    fn sizes_have_ranges() {
        let o = |ctx, max_batch| BackendOptions { ctx, max_batch };
        out_of_range_named(check_sizes(&o(0, 1)), "ctx");
        out_of_range_named(check_sizes(&o(MAX_CTX + 1, 1)), "ctx");
        out_of_range_named(check_sizes(&o(usize::MAX, 1)), "ctx");
        out_of_range_named(check_sizes(&o(1, 0)), "batch");
        out_of_range_named(check_sizes(&o(1, MAX_BATCH + 1)), "batch");
        check_sizes(&o(MAX_CTX, MAX_BATCH)).unwrap();
        check_sizes(&o(1, 1)).unwrap();
    }

    #[test]
    fn kv_sizes_do_not_overflow() {
        let c = config(1 << 20, 1 << 20, 1 << 20);
        assert_eq!(kv_cache_bytes(&c, MAX_CTX, 4), None);
        assert_eq!(
            kv_cache_bytes(&config(2, 4, 16), 10, 4),
            Some(10 * 64 * 2 * 2 * 4)
        );
        // ctx × kv_dim past u32 indices is refused before any allocation.
        let wide = config(1, 1 << 14, 1 << 10);
        out_of_range_named(
            check_backend_options(
                &wide,
                BackendKind::Cuda,
                &BackendOptions {
                    ctx: 1 << 20,
                    max_batch: 1,
                },
            ),
            "ctx",
        );
        check_backend_options(
            &wide,
            BackendKind::Cuda,
            &BackendOptions {
                ctx: 255,
                max_batch: 1,
            },
        )
        .unwrap();
    }

    #[test]
    fn cpu_cache_beyond_memory_names_the_largest_ctx() {
        let Some(avail) = host_memory_available() else {
            return;
        };
        // 4096 layers × 4096 wide: 128 MiB of KV cache per token.
        let c = config(4096, 64, 64);
        let ctx = (avail / kv_cache_bytes(&c, 1, 4).unwrap()) as usize + 8;
        let err =
            check_backend_options(&c, BackendKind::Cpu, &BackendOptions { ctx, max_batch: 1 })
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("memory is available") && err.contains("the largest --ctx that fits is"),
            "{err}"
        );
        let fits = largest_ctx_within(&c, avail, cpu_scratch_bytes(&c, 1).unwrap(), 4);
        assert!(fits < ctx && kv_cache_bytes(&c, fits, 4).unwrap() <= avail);
    }
}
