//! Chat templates: `tokenizer.chat_template`, a Jinja template, rendered with the OpenAI `messages`,
//! `add_generation_prompt` and the special tokens' texts, in the environment Hugging Face's
//! `apply_chat_template` gives it (blocks trimmed, loop controls, Python's string methods,
//! `raise_exception`).
//!
//! A message's content is data. Before rendering, each text in it that spells a special token (or
//! the escape character itself) is swapped for an escape; the rendered text is cut at the template's
//! own special tokens, and only then are the escapes put back, as plain text. So a message that
//! writes `<|im_end|>` says those characters, and cannot end its turn.

use std::collections::BTreeMap;

use minijinja::{Environment, Error, ErrorKind, Value};
use usine_engine::Message;

/// Most instructions a template runs for one conversation (minijinja's fuel): a template that loops
/// without end is stopped, not waited for.
pub const TEMPLATE_FUEL: u64 = 10_000_000;
/// Longest rendered conversation, in bytes.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError(pub String);

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChatError {}

/// The escape that stands for a message's special text: U+E000, the index, U+E001.
const ESCAPE_OPEN: char = '\u{E000}';
const ESCAPE_CLOSE: char = '\u{E001}';

/// A chat template, parsed.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// A conversation rendered: the text, and the message texts its escapes stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered text, with escapes.
    pub text: String,
    escaped: Vec<String>,
}

impl Rendered {
    /// `text` (a part of [`Rendered::text`]) with its escapes put back.
    pub fn unescape<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        if !text.contains(ESCAPE_OPEN) {
            return text.into();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(ESCAPE_OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + ESCAPE_OPEN.len_utf8()..];
            let close = after.find(ESCAPE_CLOSE);
            let index = close.and_then(|close| after[..close].parse::<usize>().ok());
            match (close, index.and_then(|index| self.escaped.get(index))) {
                (Some(close), Some(original)) => {
                    out.push_str(original);
                    rest = &after[close + ESCAPE_CLOSE.len_utf8()..];
                }
                // The template changed an escape: keep what it wrote.
                _ => {
                    out.push(ESCAPE_OPEN);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.into()
    }
}

impl Template {
    /// Parses `source`; `bos` and `eos` are the start and end tokens' texts (`bos_token`, `eos_token`).
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|error| ChatError(format!("the chat template does not parse: {error}")))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned() })
    }

    /// Renders `messages`, asking for the assistant's turn when `add_generation_prompt`; each text in
    /// a message that is one of `specials` is escaped (see the module's documentation).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        specials: &[&str],
    ) -> Result<Rendered, ChatError> {
        let mut escaped = Vec::new();
        let messages: Vec<BTreeMap<&str, String>> = messages
            .iter()
            .map(|message| {
                let content = escape(&message.content, specials, &mut escaped);
                BTreeMap::from([("role", message.role.name().to_owned()), ("content", content)])
            })
            .collect();
        let template = self.env.get_template("chat").expect("added in new");
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        };
        let text = template.render(context).map_err(|error| {
            let mut message = error.to_string();
            if let Some(detail) = error.detail() {
                message = format!("{}: {detail}", error.kind());
            }
            ChatError(format!("the chat template failed: {message}"))
        })?;
        if text.len() > MAX_RENDERED_BYTES {
            return Err(ChatError(format!(
                "the rendered conversation is {} bytes, more than the limit of {MAX_RENDERED_BYTES}",
                text.len()
            )));
        }
        Ok(Rendered { text, escaped })
    }
}

/// `content` with each of `specials` (and each escape character) swapped for an escape into
/// `escaped`.
fn escape(content: &str, specials: &[&str], escaped: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(content.len());
    let mut rest = content;
    'outer: while !rest.is_empty() {
        for c in [ESCAPE_OPEN, ESCAPE_CLOSE] {
            if rest.starts_with(c) {
                push_escape(&mut out, escaped, c.to_string());
                rest = &rest[c.len_utf8()..];
                continue 'outer;
            }
        }
        // The longest special text that starts here.
        if let Some(special) =
            specials.iter().filter(|special| !special.is_empty() && rest.starts_with(**special)).max_by_key(|s| s.len())
        {
            push_escape(&mut out, escaped, (*special).to_owned());
            rest = &rest[special.len()..];
            continue;
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn push_escape(out: &mut String, escaped: &mut Vec<String>, text: String) {
    out.push(ESCAPE_OPEN);
    out.push_str(&escaped.len().to_string());
    out.push(ESCAPE_CLOSE);
    escaped.push(text);
}

#[cfg(test)]
mod tests {
    use usine_engine::Role;

    use super::*;

    #[test]
    fn a_template_renders_the_messages_and_the_generation_prompt() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let template = Template::new(source, "", "<|im_end|>").unwrap();
        let chat = [Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi")];
        let rendered = template.render(&chat, true, &[]).unwrap();
        assert_eq!(
            rendered.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn special_texts_in_a_message_are_escaped_and_come_back_as_text() {
        let template = Template::new("[{{ messages[0].content | trim }}]", "", "").unwrap();
        let content = "  a<|im_end|>b\u{E000}0\u{E001}<|im_end|  ";
        let rendered = template.render(&[Message::new(Role::User, content)], false, &["<|im_end|>", "<|im"]).unwrap();
        assert!(!rendered.text.contains("<|im_end|>"), "{:?}", rendered.text);
        assert_eq!(rendered.unescape(&rendered.text), format!("[{}]", content.trim()));
    }

    #[test]
    fn a_template_that_raises_or_fails_is_an_error_not_a_crash() {
        let raising = "{% if messages[0].role != 'system' %}{{ raise_exception(\"the first message must be the system's\") }}{% endif %}";
        let template = Template::new(raising, "", "").unwrap();
        let error = template.render(&[Message::new(Role::User, "x")], true, &[]).unwrap_err();
        assert!(error.0.contains("the first message must be the system's"), "{error}");
        let endless =
            Template::new("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "", "")
                .unwrap();
        let error = endless.render(&[], true, &[]).unwrap_err();
        assert!(error.0.contains("fuel"), "{error}");
        assert!(Template::new("{% for %}", "", "").unwrap_err().0.contains("does not parse"));
        let methods = Template::new("{{ messages[0].content.strip().upper() }}", "", "").unwrap();
        assert_eq!(methods.render(&[Message::new(Role::User, " hi ")], false, &[]).unwrap().text, "HI");
    }
}
