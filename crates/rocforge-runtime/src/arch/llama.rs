//! Llama (Touvron et al., 2023) and its family (SmolLM2, TinyLlama, Mistral, Llama 2/3):
//! pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query attention and a
//! SwiGLU feed-forward; the output projection may be tied to the embeddings.

use super::{Activation, RopeKind, Step};
use crate::model::ModelConfig;

/// ```text
/// x = token_embd[tokens]
/// for each layer:
///     x += W_o · attention(rope(W_q · rmsnorm(x)), rope(W_k · rmsnorm(x)), W_v · rmsnorm(x))
///     x += W_down · (silu(W_gate · rmsnorm(x)) * (W_up · rmsnorm(x)))
/// logits = W_out · rmsnorm(x)
/// ```
pub fn plan(c: &ModelConfig) -> Vec<Step> {
    let mut steps = vec![Step::Embed { scale: 1.0 }];
    for layer in 0..c.n_layer {
        steps.extend([
            Step::AttnIn { layer },
            Step::RopeStore {
                layer,
                qk_norm: false,
                rope: RopeKind::Global,
            },
            Step::Attention {
                layer,
                window: None,
            },
            Step::AttnOut {
                layer,
                post_norm: false,
            },
            Step::FfnIn {
                layer,
                act: Activation::Silu,
            },
            Step::FfnOut {
                layer,
                post_norm: false,
            },
        ]);
    }
    steps.push(Step::Logits);
    steps
}
