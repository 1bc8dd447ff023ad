//! The chat template renderer on arbitrary templates and messages, under the memory budget
//! `rocforge` enforces (the same counting allocator, failing the allocation instead of exiting).
//! Properties: it returns (libFuzzer's -timeout catches a render that does not: fuel must stop
//! every loop), its output stays under the cap, and it never holds more than its budget (an
//! allocation past it fails and unwinds here; one that escapes the bound trips -rss_limit_mb).
#![no_main]
#![feature(alloc_error_hook)]

#[path = "common.rs"]
mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::{fuzz_target, Corpus};
use rocforge_runtime::tokenizer::{render_chat_template_str, Budget, ChatMessage, TemplateAllocator};

#[global_allocator]
static ALLOC: TemplateAllocator = TemplateAllocator::fail_on_overrun();

/// The unwind payload of an allocation past a template's budget.
struct Overran;

/// Makes an allocation that failed because of the budget unwind (a real OOM still aborts), and
/// keeps libFuzzer's abort-on-panic hook from treating that unwind as a crash.
fn unwind_on_overrun() {
    std::alloc::set_alloc_error_hook(|_| {
        if Budget::overran() {
            std::panic::panic_any(Overran);
        }
    });
    let libfuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload().is::<Overran>() {
            libfuzzer_hook(info);
        }
    }));
}

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
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ d('xy', 60) }}",
];

fuzz_target!(init: {
    unwind_on_overrun();
    common::write_seeds(SEEDS.iter().enumerate().map(|(i, s)| (format!("template-{i}"), s.as_bytes().to_vec())))
}, |data: &[u8]| -> Corpus {
    // Raw bytes as a template with one fixed conversation, then a structured input.
    let fixed = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    let mut overran = false;
    if let Ok(template) = std::str::from_utf8(data) {
        overran |= render(template, &fixed, true);
    }
    if let Ok(input) = Input::arbitrary(&mut arbitrary::Unstructured::new(data)) {
        let messages: Vec<ChatMessage> = input.messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
        overran |= render(&input.template, &messages, input.add_generation_prompt);
    }
    // Inputs that hit the budget are slow (tens of MiB copied) and stay out of the corpus; the
    // doubling seeds run at every start.
    if overran { Corpus::Reject } else { Corpus::Keep }
});

/// Renders; true when the render went past its memory budget.
fn render(template: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> bool {
    let input: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    let result = std::panic::catch_unwind(|| {
        render_chat_template_str(template, messages, add_generation_prompt, "<s>", "</s>")
    });
    match result {
        Ok(Ok(out)) => assert!(
            out.len() <= (1 << 20) + 4 * input,
            "{} bytes of output",
            out.len()
        ),
        Ok(Err(_)) => {}
        Err(payload) if payload.is::<Overran>() => return true,
        Err(payload) => std::panic::resume_unwind(payload),
    }
    false
}
