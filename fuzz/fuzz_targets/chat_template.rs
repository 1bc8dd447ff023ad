//! The chat template renderer on arbitrary templates and messages. Properties: it returns
//! (libFuzzer's -timeout catches a render that does not: fuel must stop every loop) and its
//! output stays under the cap.
#![no_main]

#[path = "common.rs"]
mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rocforge_runtime::tokenizer::{render_chat_template_str, ChatMessage};

#[derive(Arbitrary, Debug)]
struct Input {
    template: String,
    messages: Vec<(String, String)>,
    add_generation_prompt: bool,
}

/// Real templates' shapes (ChatML with loops, a Llama-3-like one with namespace, conditions,
/// filters and raise_exception) and the hostile ones the fuel and cap exist for.
const SEEDS: &[&str] = &[
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content | trim %}{% endif %}{% endfor %}{% for m in messages %}{% if m.role != 'system' %}<|start_header_id|>{{ m.role }}<|end_header_id|>\\n\\n{{ (ns.sys ~ m.content) | trim }}<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\\n\\n{% endif %}",
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% for m in messages %}[{{ m.role | upper }}]{{ m['content'].strip() }}{% endfor %}{{ strftime_now('%d %b %Y') }}{{ eos_token }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}",
];

fuzz_target!(init: common::write_seeds(SEEDS.iter().enumerate().map(|(i, s)| (format!("template-{i}"), s.as_bytes().to_vec()))), |data: &[u8]| {
    // Raw bytes as a template with one fixed conversation, then a structured input.
    let fixed = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    if let Ok(template) = std::str::from_utf8(data) {
        render(template, &fixed, true);
    }
    let Ok(input) = Input::arbitrary(&mut arbitrary::Unstructured::new(data)) else { return };
    let messages: Vec<ChatMessage> = input.messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
    render(&input.template, &messages, input.add_generation_prompt);
});

fn render(template: &str, messages: &[ChatMessage], add_generation_prompt: bool) {
    let input: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    if let Ok(out) =
        render_chat_template_str(template, messages, add_generation_prompt, "<s>", "</s>")
    {
        assert!(
            out.len() <= (1 << 20) + 4 * input,
            "{} bytes of output",
            out.len()
        );
    }
}
