//! The vocabularies generated model files carry: the project's two trained vocabularies (committed in
//! `engines/candle/vocab/`, made again by `cargo xtask vocab`), each with the pre-tokenizer and chat
//! template of a real model family, and the bytes.
//!
//! The templates are written for the tests in the shapes real models use, each rendering what
//! llama.cpp's built-in template of that family renders (`cargo xtask parity` compares them).

use serde::Deserialize;

use super::{Kind, Pre, TokenType, Vocabulary};

/// ChatML, as Qwen2.5 and SmolLM use it.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] \
    + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's header tokens, each message's content trimmed.
pub const LLAMA3: &str = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + \
    '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}\
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Mistral's `[INST]` turns, a system message as the first turn's first line.
pub const MISTRAL: &str = "{% for message in messages %}{% if loop.first or messages[loop.index0 - 1]['role'] == \
    'assistant' %}{{ '[INST] ' }}{% endif %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}\
    {% elif message['role'] == 'user' %}{{ message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + \
    eos_token }}{% endif %}{% endfor %}";

/// Llama 2's `<<SYS>>` block, with its rules: a system message comes first, then user and assistant
/// alternate from the user.
pub const LLAMA2_SYSTEM: &str = "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}\
    {% set rest = messages[1:] %}{% set has_system = true %}{% else %}{% set rest = messages %}\
    {% set has_system = false %}{% endif %}{% for message in rest %}{% if message['role'] == 'system' %}\
    {{ raise_exception('a system message comes first, and only once') }}{% endif %}\
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
    {{ raise_exception('user and assistant messages must alternate, from the user') }}{% endif %}\
    {% if loop.first %}{{ '[INST] ' }}{% if has_system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}\
    {% elif message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}{% if message['role'] == 'user' %}\
    {{ message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

/// The vocabularies a generated file can carry, by name: `bytes` (usine's byte-level one, no
/// template), and the trained ones: `mistral` and `llama2` (the `llama` kind), `gpt2`, `qwen2`,
/// `llama3` and `smollm` (the `gpt2` kind, with those pre-tokenizers).
pub const VOCABULARIES: [&str; 7] = ["bytes", "mistral", "llama2", "gpt2", "qwen2", "llama3", "smollm"];

#[derive(Deserialize)]
struct Trained {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    merges: Vec<String>,
}

fn trained(json: &str) -> Trained {
    serde_json::from_str(json).expect("the committed vocabularies parse (a test reads each)")
}

/// The vocabulary `name` (one of [`VOCABULARIES`]) with at least `size` tokens: filler control tokens
/// after its own make a vocabulary of a real model's size. `None` for an unknown name.
pub fn vocabulary(name: &str, size: usize) -> Option<Vocabulary> {
    let (json, kind, pre, template) = match name {
        "bytes" => return Some(bytes(size)),
        "mistral" => (include_str!("../../vocab/llama.json"), Kind::Spm, Pre::None, Some(MISTRAL)),
        "llama2" => (include_str!("../../vocab/llama.json"), Kind::Spm, Pre::None, Some(LLAMA2_SYSTEM)),
        "gpt2" => (include_str!("../../vocab/gpt2.json"), Kind::Bpe, Pre::Gpt2, None),
        "qwen2" => (include_str!("../../vocab/gpt2.json"), Kind::Bpe, Pre::Qwen2, Some(CHATML)),
        "llama3" => (include_str!("../../vocab/gpt2.json"), Kind::Bpe, Pre::Llama3, Some(LLAMA3)),
        "smollm" => (include_str!("../../vocab/gpt2.json"), Kind::Bpe, Pre::SmolLm, Some(CHATML)),
        _ => return None,
    };
    let trained = trained(json);
    let mut vocabulary = Vocabulary {
        kind,
        pre,
        types: trained.types.iter().map(|&kind| TokenType::from_gguf(i64::from(kind))).collect(),
        scores: trained.scores,
        merges: trained.merges,
        bos: None,
        eos: None,
        eot: None,
        eom: None,
        unk: None,
        add_bos: false,
        add_eos: false,
        add_space_prefix: kind == Kind::Spm,
        chat_template: template.map(str::to_owned),
        end_of_generation: Vec::new(),
        tokens: trained.tokens,
    };
    let tokens = vocabulary.tokens.clone();
    let find = |text: &str| tokens.iter().position(|token| token == text).and_then(|id| u32::try_from(id).ok());
    match name {
        "qwen2" | "smollm" => {
            (vocabulary.bos, vocabulary.eos, vocabulary.eot) =
                (find("<|endoftext|>"), find("<|im_end|>"), find("<|im_end|>"));
        }
        "llama3" => {
            (vocabulary.bos, vocabulary.eos, vocabulary.eot) =
                (find("<|begin_of_text|>"), find("<|endoftext|>"), find("<|eot_id|>"));
            vocabulary.add_bos = true;
        }
        "gpt2" => (vocabulary.bos, vocabulary.eos) = (find("<|endoftext|>"), find("<|endoftext|>")),
        _ => {
            (vocabulary.unk, vocabulary.bos, vocabulary.eos) = (find("<unk>"), find("<s>"), find("</s>"));
            vocabulary.add_bos = true;
        }
    }
    pad(&mut vocabulary, size);
    vocabulary.settle([None; 3]);
    Some(vocabulary)
}

/// usine's byte-level vocabulary: the bytes in GPT-2's alphabet, the end token (also the start), and
/// fillers up to `size`.
fn bytes(size: usize) -> Vocabulary {
    let mut tokens: Vec<String> = (0..=255).map(crate::gguf::byte_token).collect();
    tokens.push("<|endoftext|>".to_owned());
    let mut types = vec![TokenType::Normal; 256];
    types.push(TokenType::Control);
    let mut vocabulary = Vocabulary {
        kind: Kind::Bpe,
        pre: Pre::None,
        scores: vec![0.0; tokens.len()],
        tokens,
        types,
        merges: Vec::new(),
        bos: Some(crate::shape::END_OF_SEQUENCE),
        eos: Some(crate::shape::END_OF_SEQUENCE),
        eot: None,
        eom: None,
        unk: None,
        add_bos: false,
        add_eos: false,
        add_space_prefix: false,
        chat_template: None,
        end_of_generation: Vec::new(),
    };
    pad(&mut vocabulary, size);
    vocabulary.settle([None; 3]);
    vocabulary
}

/// Control tokens after the vocabulary's own, up to `size`.
fn pad(vocabulary: &mut Vocabulary, size: usize) {
    for index in 0..size.saturating_sub(vocabulary.tokens.len()) {
        vocabulary.tokens.push(format!("<|filler_{index}|>"));
        vocabulary.scores.push(0.0);
        vocabulary.types.push(TokenType::Control);
    }
}
