//! Chat prompts: the model's Hugging Face chat template (`tokenizer.chat_template`)
//! rendered with minijinja under the settings `transformers` uses (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`, `strftime_now`), with ChatML
//! as the fallback for models without a usable template.
//!
//! The template comes from the model file, so it is untrusted code: it runs with a fuel
//! limit (minijinja counts one unit per instruction, so a loop cannot run forever) and its
//! output is capped. minijinja itself caps recursion, `range` and `str * n`, but not the size
//! of a value: string concatenation (`s ~ s` doubled in a recursive macro or a namespace
//! loop) asks for gigabytes within a few dozen instructions. So the render also runs inside a
//! memory [`Budget`] ([`MEMORY_BASE`] + [`MEMORY_PER_INPUT_BYTE`] x the template's and the
//! messages' bytes), which binaries enforce by installing [`super::TemplateAllocator`]:
//! `rocforge` then exits with status 1 and one line. Without that allocator (a library user's
//! own binary) concatenation stays unbounded (docs/architecture.md, "Inputs we distrust").

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::budget::Budget;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Instructions a template may execute: real templates use a few hundred per message.
pub const FUEL_BASE: u64 = 1_000_000;
/// Extra instructions allowed per message.
pub const FUEL_PER_MESSAGE: u64 = 10_000;
/// Output cap: this much plus [`OUTPUT_PER_INPUT_BYTE`] times the messages' text.
pub const OUTPUT_BASE: usize = 1 << 20;
pub const OUTPUT_PER_INPUT_BYTE: usize = 4;
/// Memory a render may hold at once (where [`super::TemplateAllocator`] is installed): this
/// much plus [`MEMORY_PER_INPUT_BYTE`] times the template's and the messages' bytes: room for
/// the capped output and the template's own values many times over.
pub const MEMORY_BASE: usize = 64 << 20;
pub const MEMORY_PER_INPUT_BYTE: usize = 16;

/// The memory budget of rendering `template` for messages of `input` bytes.
pub fn memory_budget(template: &str, input: usize) -> usize {
    MEMORY_BASE
        .saturating_add(MEMORY_PER_INPUT_BYTE.saturating_mul(input.saturating_add(template.len())))
}

/// A writer that fails once more than `limit` bytes were written.
struct Capped {
    out: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output cap"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `template` for `messages`; errors when it does not compile or render, runs out of
/// fuel, or writes more than the output cap. Where the binary installs
/// [`super::TemplateAllocator`], a render that holds more than [`memory_budget`] bytes ends the
/// process (or fails its allocation) instead.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", strftime_now);
    let n = messages.len() as u64;
    env.set_fuel(Some(
        FUEL_BASE.saturating_add(FUEL_PER_MESSAGE.saturating_mul(n)),
    ));
    let input: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    let limit = OUTPUT_BASE.saturating_add(OUTPUT_PER_INPUT_BYTE.saturating_mul(input));
    let _budget = Budget::enter(memory_budget(template, input));
    let mut out = Capped {
        out: Vec::new(),
        limit,
        overflowed: false,
    };
    let compiled = env.template_from_str(template)?;
    let rendered = compiled
        .render_captured_to(
            context! { messages, add_generation_prompt, bos_token, eos_token },
            &mut out,
        )
        .map(|_| ());
    match rendered {
        Ok(()) => String::from_utf8(out.out)
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, "the output is not UTF-8")),
        Err(_) if out.overflowed => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("the rendered prompt exceeds {limit} bytes"),
        )),
        Err(e) => Err(e),
    }
}

/// ChatML, the format of the SmolLM and Qwen families.
pub fn render_chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// The current UTC date for templates that print it (Llama 3.x); supports %d %m %Y %b %B.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%b", &name[..3])
        .replace("%B", name)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    #[track_caller]
    fn fails_fast(template: &str, expect: &str) {
        let t = std::time::Instant::now();
        let err =
            render_template(template, &user("hi"), true, "<s>", "</s>").expect_err("must fail");
        assert!(err.to_string().contains(expect), "{err}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn endless_loops_run_out_of_fuel() {
        fails_fast(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "out of fuel",
        );
        fails_fast("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{{ m.role }}{% endfor %}{% endfor %}{% endfor %}", "");
    }

    #[test]
    fn output_is_capped() {
        // 100 000 × 100 bytes = 10 MB, over the 1 MiB + 4 × input cap, within the fuel.
        fails_fast(
            "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
            "exceeds",
        );
        // A long message is not refused for being long.
        let long = "z".repeat(3 << 20);
        let out = render_template(
            "{{ messages[0].content }}{{ messages[0].content }}",
            &user(&long),
            true,
            "",
            "",
        )
        .unwrap();
        assert_eq!(out.len(), 6 << 20);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
