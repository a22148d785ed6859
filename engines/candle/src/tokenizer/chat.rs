//! Chat templates: `tokenizer.chat_template`, a Jinja template, rendered with the OpenAI `messages`,
//! `add_generation_prompt` and the special tokens' texts, in the environment Hugging Face's
//! `apply_chat_template` gives it (blocks trimmed, loop controls, Python's string methods,
//! `raise_exception`).
//!
//! A message's content is data. Before rendering, each text in it that spells one of the
//! vocabulary's control tokens (or the escape character itself) is swapped for an escape; the rendered
//! text is cut at the template's own special tokens, and only then are the escapes put back, as plain
//! text. So a message that writes `<|im_end|>` says those characters, and cannot end its turn. What
//! this cannot cover: a template that transforms a message (changes its case, removes characters)
//! could make a control token's text out of one; and where a template's turn markers are plain text
//! rather than control tokens, a message can write them like any text.
//!
//! A template is trusted as the weights are (it comes in the model file): the fuel limit stops one
//! that loops, the output is capped at [`MAX_RENDERED_BYTES`], but a template that grows a string
//! without end inside one expression (`s ~ s` in a loop) is not bounded by either.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, MatchKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use usine_engine::Message;

/// Most instructions a template runs for one conversation (minijinja's fuel): a template that loops
/// without end is stopped, not waited for.
pub const TEMPLATE_FUEL: u64 = 10_000_000;
/// Longest rendered conversation, in bytes: the render stops there.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatError {
    /// The template refused the conversation (`raise_exception`: roles out of order, say), or it renders
    /// longer than [`MAX_RENDERED_BYTES`]: the caller's to change.
    Refused(String),
    /// The template does not parse, or fails on its own (an unknown filter, no fuel left): the
    /// model's.
    Broken(String),
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(message) | Self::Broken(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ChatError {}

/// What `raise_exception` raises: told apart from the template's own failures.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

/// The texts a message may not spell (a vocabulary's control tokens, and the escape characters), found
/// leftmost-longest in one pass.
#[derive(Debug)]
pub struct Guard {
    texts: Vec<String>,
    automaton: AhoCorasick,
}

impl Guard {
    /// A guard of `texts` (empty ones are skipped).
    pub fn new(texts: &[&str]) -> Self {
        let mut texts: Vec<String> =
            texts.iter().filter(|text| !text.is_empty()).map(|text| (*text).to_owned()).collect();
        texts.extend([ESCAPE_OPEN, ESCAPE_CLOSE].map(String::from));
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .expect("a few hundred thousand short texts build");
        Self { texts, automaton }
    }
}

/// Collects the rendered text up to [`MAX_RENDERED_BYTES`], then fails the render.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + bytes.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!(
                "the rendered conversation is longer than {MAX_RENDERED_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
            Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
        });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|error| ChatError::Broken(format!("the model's chat template does not parse: {error}")))?;
        Ok(Self { env, bos: bos.to_owned(), eos: eos.to_owned() })
    }

    /// Renders `messages`, asking for the assistant's turn when `add_generation_prompt`; each text in a
    /// message that `guard` holds is escaped (see the module's documentation).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        guard: &Guard,
    ) -> Result<Rendered, ChatError> {
        let mut escaped = Vec::new();
        let messages: Vec<BTreeMap<&str, String>> = messages
            .iter()
            .map(|message| {
                let content = escape(&message.content, guard, &mut escaped);
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
        let mut out = Capped(Vec::new());
        if let Err(error) = template.render_captured_to(context, &mut out) {
            let detail = error.detail().map_or_else(|| error.to_string(), str::to_owned);
            let raised = std::error::Error::source(&error).is_some_and(|source| source.is::<Raised>());
            return Err(if raised {
                ChatError::Refused(format!("the model's chat template refuses this conversation: {detail}"))
            } else if error.kind() == ErrorKind::WriteFailure {
                // The one writer here fails only past its cap.
                ChatError::Refused(format!(
                    "the conversation rendered by the model's chat template is longer than {MAX_RENDERED_BYTES} bytes"
                ))
            } else {
                ChatError::Broken(format!("the model's chat template failed: {}: {detail}", error.kind()))
            });
        }
        let text =
            String::from_utf8(out.0).map_err(|_| ChatError::Broken("the template wrote invalid UTF-8".into()))?;
        Ok(Rendered { text, escaped })
    }
}

/// `content` with each text `guard` holds (leftmost, longest first) swapped for an escape into
/// `escaped`.
fn escape(content: &str, guard: &Guard, escaped: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(content.len());
    let mut last = 0;
    for found in guard.automaton.find_iter(content) {
        out.push_str(&content[last..found.start()]);
        out.push(ESCAPE_OPEN);
        out.push_str(&escaped.len().to_string());
        out.push(ESCAPE_CLOSE);
        escaped.push(guard.texts[found.pattern().as_usize()].clone());
        last = found.end();
    }
    out.push_str(&content[last..]);
    out
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
        let rendered = template.render(&chat, true, &Guard::new(&[])).unwrap();
        assert_eq!(
            rendered.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn special_texts_in_a_message_are_escaped_and_come_back_as_text() {
        let template = Template::new("[{{ messages[0].content | trim }}]", "", "").unwrap();
        let content = "  a<|im_end|>b\u{E000}0\u{E001}<|im_end|  ";
        let guard = Guard::new(&["<|im_end|>", "<|im"]);
        let rendered = template.render(&[Message::new(Role::User, content)], false, &guard).unwrap();
        assert!(!rendered.text.contains("<|im_end|>"), "{:?}", rendered.text);
        assert_eq!(rendered.unescape(&rendered.text), format!("[{}]", content.trim()));
    }

    #[test]
    fn a_template_that_raises_or_fails_is_an_error_not_a_crash() {
        let none = Guard::new(&[]);
        let raising = "{% if messages[0].role != 'system' %}{{ raise_exception(\"the first message must be the system's\") }}{% endif %}";
        let template = Template::new(raising, "", "").unwrap();
        let error = template.render(&[Message::new(Role::User, "x")], true, &none).unwrap_err();
        assert!(
            matches!(&error, ChatError::Refused(message) if message.contains("the first message must be the system's")),
            "{error:?}"
        );
        let endless =
            Template::new("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "", "")
                .unwrap();
        let error = endless.render(&[], true, &none).unwrap_err();
        assert!(matches!(&error, ChatError::Broken(message) if message.contains("fuel")), "{error:?}");
        let huge = Template::new("{% for i in range(1000) %}{{ messages[0].content }}{% endfor %}", "", "").unwrap();
        let error = huge.render(&[Message::new(Role::User, "x".repeat(1 << 15))], true, &none).unwrap_err();
        assert!(matches!(&error, ChatError::Refused(message) if message.contains("longer than")), "{error:?}");
        assert!(
            matches!(Template::new("{% for %}", "", ""), Err(ChatError::Broken(message)) if message.contains("does not parse"))
        );
        let unknown = Template::new("{{ messages | nonesuch }}", "", "").unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(unknown.render(&[], true, &none), Err(ChatError::Broken(_))));
        let methods = Template::new("{{ messages[0].content.strip().upper() }}", "", "").unwrap();
        assert_eq!(methods.render(&[Message::new(Role::User, " hi ")], false, &none).unwrap().text, "HI");
    }
}
