//! Gemma 3 (Gemma Team, 2025), text part: Llama's block with a norm after each sublayer as
//! well as before it ("sandwich" norms), RMSNorm of every query and key head before RoPE,
//! a GELU-gated feed-forward (GeGLU), and five sliding-window layers (RoPE base 10 000, a
//! window of `attention.sliding_window` keys) for every global one (the model's RoPE base,
//! full causal attention). The embeddings are scaled by sqrt(n_embd); the output is tied.
//! The converter has already folded Gemma's `1 + w` into every stored norm weight.

use super::{Activation, RopeKind, Step};
use crate::model::ModelConfig;

/// ```text
/// x = token_embd[tokens] * sqrt(n_embd)
/// for each layer (local: 5 of every 6, the last of each 6 global):
///     q, k, v = W_q · rmsnorm(x), W_k · rmsnorm(x), W_v · rmsnorm(x)
///     q, k = rope_{local|global}(rmsnorm_head(q)), rope_{local|global}(rmsnorm_head(k))
///     x += rmsnorm(W_o · attention_{window|causal}(q, k, v))
///     x += rmsnorm(W_down · (gelu(W_gate · rmsnorm(x)) * (W_up · rmsnorm(x))))
/// logits = W_out · rmsnorm(x)
/// ```
pub fn plan(c: &ModelConfig) -> Vec<Step> {
    let mut steps = vec![Step::Embed {
        scale: c.embd_scale,
    }];
    for layer in 0..c.n_layer {
        let rope = if c.is_local_layer(layer) {
            RopeKind::Local
        } else {
            RopeKind::Global
        };
        steps.extend([
            Step::AttnIn { layer },
            Step::RopeStore {
                layer,
                qk_norm: true,
                rope,
            },
            Step::Attention {
                layer,
                window: c.window(layer),
            },
            Step::AttnOut {
                layer,
                post_norm: true,
            },
            Step::FfnIn {
                layer,
                act: Activation::GeluTanh,
            },
            Step::FfnOut {
                layer,
                post_norm: true,
            },
        ]);
    }
    steps.push(Step::Logits);
    steps
}
