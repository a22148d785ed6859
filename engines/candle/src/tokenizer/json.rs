//! Hugging Face's `tokenizer.json` (and `tokenizer_config.json` beside it) as a [`Vocabulary`]: the
//! byte-level BPE kind, whose pre-tokenizer is one of those usine runs (GPT-2's byte-level expression,
//! Llama 3's or Qwen2's split, SmolLM's digits), as llama.cpp's converter reads it. What would change
//! the tokens and usine does not run (a normalizer, another model type, a SentencePiece-style
//! vocabulary, dropout, subword affixes, stripping added tokens) is refused by name.

use std::collections::HashMap;

use serde_json::Value;

use super::{Kind, Pre, TokenType, Vocabulary};

/// Llama 3's expression, as its `tokenizer.json` writes it.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's.
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn kind_of(value: &Value) -> &str {
    value.get("type").and_then(Value::as_str).unwrap_or("?")
}

fn byte_level(value: &Value, use_regex: bool) -> bool {
    kind_of(value) == "ByteLevel"
        && value.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
        && value.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == use_regex
}

/// The pre-tokenizer a `pre_tokenizer` object stands for.
fn pre_of(pre: &Value) -> Result<Pre, String> {
    if byte_level(pre, true) {
        return Ok(Pre::Gpt2);
    }
    let parts = match pre.get("pretokenizers").and_then(Value::as_array) {
        Some(parts) if kind_of(pre) == "Sequence" => parts.as_slice(),
        _ => &[],
    };
    match parts {
        [split, level]
            if kind_of(split) == "Split"
                && split.get("behavior").and_then(Value::as_str) == Some("Isolated")
                && split.get("invert").and_then(Value::as_bool) != Some(true)
                && byte_level(level, false) =>
        {
            let pattern = split.get("pattern").and_then(|pattern| pattern.get("Regex")).and_then(Value::as_str);
            match pattern {
                Some(LLAMA3) => Ok(Pre::Llama3),
                Some(QWEN2) => Ok(Pre::Qwen2),
                _ => Err(format!("its pre-tokenizer splits by {pattern:?}, not Llama 3's or Qwen2's expression")),
            }
        }
        [digits, level]
            if kind_of(digits) == "Digits"
                && digits.get("individual_digits").and_then(Value::as_bool) == Some(true)
                && byte_level(level, true) =>
        {
            Ok(Pre::SmolLm)
        }
        _ => Err(format!("its pre-tokenizer ({}) is not one usine reads", pre)),
    }
}

/// The text of a `tokenizer_config.json` token (a string, or an object with `content`).
fn token_text(value: Option<&Value>) -> Option<&str> {
    value.and_then(|value| value.as_str().or_else(|| value.get("content").and_then(Value::as_str)))
}

/// The vocabulary of `tokenizer` (a `tokenizer.json`'s text) and of `config` (its
/// `tokenizer_config.json`, if there is one: the start and end tokens, `add_bos_token`, the chat
/// template).
pub fn from_tokenizer_json(tokenizer: &str, config: Option<&str>) -> Result<Vocabulary, String> {
    let json: Value = serde_json::from_str(tokenizer).map_err(|error| format!("tokenizer.json: {error}"))?;
    let model = json.get("model").ok_or("tokenizer.json has no `model`")?;
    if kind_of(model) != "BPE" || model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "tokenizer.json's model is {}{}: usine reads byte-level BPE (a SentencePiece vocabulary comes in a GGUF \
             file)",
            kind_of(model),
            if kind_of(model) == "BPE" { " with byte fallback" } else { "" }
        ));
    }
    let unset = |value: Option<&Value>| value.is_none_or(|value| value.is_null() || value.as_str() == Some(""));
    for option in ["dropout", "continuing_subword_prefix", "end_of_word_suffix", "unk_token"] {
        if !unset(model.get(option)) {
            return Err(format!(
                "tokenizer.json's model sets `{option}` ({}), which usine does not run",
                model[option]
            ));
        }
    }
    if json.get("normalizer").is_some_and(|normalizer| !normalizer.is_null()) {
        return Err(format!(
            "tokenizer.json has a normalizer ({}), which usine does not run",
            kind_of(&json["normalizer"])
        ));
    }
    let pre = pre_of(json.get("pre_tokenizer").unwrap_or(&Value::Null))
        .map_err(|reason| format!("tokenizer.json: {reason}"))?;
    // llama.cpp takes a word that is a token whole (`ignore_merges`) by the pre-tokenizer: Llama 3's.
    let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool).unwrap_or(false);
    if ignore_merges != pre.ignores_merges() {
        return Err(format!(
            "tokenizer.json's model has `ignore_merges` {ignore_merges}; usine (as llama.cpp) takes it from the \
             pre-tokenizer, whose is {}",
            pre.ignores_merges()
        ));
    }
    let mut by_id: HashMap<u64, (String, TokenType)> = HashMap::new();
    let vocab = model.get("vocab").and_then(Value::as_object).ok_or("tokenizer.json's model has no `vocab`")?;
    for (text, id) in vocab {
        let id = id.as_u64().ok_or_else(|| format!("tokenizer.json: token {text:?} has no id"))?;
        by_id.insert(id, (text.clone(), TokenType::Normal));
    }
    for added in json.get("added_tokens").and_then(Value::as_array).map_or(&[][..], Vec::as_slice) {
        let (Some(id), Some(text)) =
            (added.get("id").and_then(Value::as_u64), added.get("content").and_then(Value::as_str))
        else {
            return Err(format!("tokenizer.json: an added token without an id or content: {added}"));
        };
        if let Some(flag) = ["lstrip", "rstrip", "single_word"].into_iter().find(|flag| added[*flag] == true) {
            return Err(format!("tokenizer.json: added token {text:?} sets `{flag}`, which usine does not run"));
        }
        let special = added.get("special").and_then(Value::as_bool) == Some(true);
        by_id.insert(id, (text.to_owned(), if special { TokenType::Control } else { TokenType::UserDefined }));
    }
    let count = by_id.len();
    if count > super::MAX_TOKENS {
        return Err(format!("tokenizer.json holds {count} tokens, more than {}", super::MAX_TOKENS));
    }
    let mut tokens = Vec::with_capacity(count);
    let mut types = Vec::with_capacity(count);
    for id in 0..count as u64 {
        let (text, kind) = by_id.remove(&id).ok_or_else(|| format!("tokenizer.json: no token has id {id}"))?;
        tokens.push(text);
        types.push(kind);
    }
    super::check_tokens(&tokens).map_err(|reason| format!("tokenizer.json: {reason}"))?;
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|merge| match merge {
            Value::String(merge) => Ok(merge.clone()),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(left), Value::String(right)] => Ok(format!("{left} {right}")),
                _ => Err(format!("tokenizer.json: a merge {merge}")),
            },
            _ => Err(format!("tokenizer.json: a merge {merge}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    super::bpe::check(&merges)?;
    let config: Value = match config {
        Some(text) => serde_json::from_str(text).map_err(|error| format!("tokenizer_config.json: {error}"))?,
        None => Value::Null,
    };
    let find = |key: &str| -> Result<Option<u32>, String> {
        match token_text(config.get(key)) {
            None => Ok(None),
            Some(text) => tokens
                .iter()
                .position(|token| token == text)
                .map(|id| Some(u32::try_from(id).expect("bounded by MAX_TOKENS")))
                .ok_or_else(|| format!("tokenizer_config.json's `{key}` {text:?} is no token")),
        }
    };
    let (bos, eos) = (find("bos_token")?, find("eos_token")?);
    let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(pre.adds_bos()) && bos.is_some();
    let chat_template = match config.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(template)) => Some(template.clone()),
        // Named templates: the default one.
        Some(Value::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|entry| entry.get("template").and_then(Value::as_str))
            .map(str::to_owned),
        Some(other) => return Err(format!("tokenizer_config.json's `chat_template` is {other}")),
    };
    let mut vocabulary = Vocabulary {
        kind: Kind::Bpe,
        pre: if merges.is_empty() { Pre::None } else { pre },
        scores: vec![0.0; tokens.len()],
        tokens,
        types,
        merges,
        bos,
        eos,
        eot: None,
        eom: None,
        unk: None,
        add_bos,
        add_eos: false,
        add_space_prefix: false,
        chat_template,
        end_of_generation: Vec::new(),
    };
    vocabulary.settle([None; 3]);
    Ok(vocabulary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;
    use crate::tokenizer::Tokenizer;

    const LLAMA3_JSON: &str = include_str!("../../vocab/hf-llama3.tokenizer.json");
    const LLAMA3_CONFIG: &str = include_str!("../../vocab/hf-llama3.tokenizer_config.json");
    const LLAMA3_EXPECTED: &str = include_str!("../../vocab/hf-llama3.expected.json");

    // Would catch: a tokenizer.json read into other tokens, merges or pre-tokenizer than Hugging Face's
    // own library runs (its ids of these strings were written when the file was trained).
    #[test]
    fn a_tokenizer_json_tokenizes_as_hugging_face_does() {
        let vocabulary = from_tokenizer_json(LLAMA3_JSON, Some(LLAMA3_CONFIG)).unwrap();
        assert_eq!((vocabulary.kind, vocabulary.pre, vocabulary.tokens.len()), (Kind::Bpe, Pre::Llama3, 400));
        assert_eq!(vocabulary.types[399], TokenType::UserDefined);
        assert_eq!(vocabulary.text(vocabulary.bos), "<|begin_of_text|>");
        assert_eq!(vocabulary.text(vocabulary.eos), "<|eot_id|>");
        let tokenizer = Tokenizer::new(vocabulary);
        let expected: Value = serde_json::from_str(LLAMA3_EXPECTED).unwrap();
        let strings = expected["strings"].as_array().unwrap();
        for (text, ids) in strings.iter().zip(expected["ids"].as_array().unwrap()) {
            let text = text.as_str().unwrap();
            let ids: Vec<u32> =
                ids.as_array().unwrap().iter().map(|id| u32::try_from(id.as_u64().unwrap()).unwrap()).collect();
            // Hugging Face cuts its added tokens out of any text: llama.cpp's way of asking for that.
            assert_eq!(tokenizer.encode(text, false, true), ids, "{text:?}");
            assert_eq!(tokenizer.decode(&tokenizer.encode(text, false, false)), text);
        }
        assert!(strings.len() >= 9);
    }

    #[test]
    fn the_byte_tokenizer_json_brings_its_template_and_end_token() {
        let vocabulary = from_tokenizer_json(
            include_str!("../../vocab/hf-bytes.tokenizer.json"),
            Some(include_str!("../../vocab/hf-bytes.tokenizer_config.json")),
        )
        .unwrap();
        assert_eq!((vocabulary.pre, vocabulary.tokens.len()), (Pre::None, 257));
        assert!(vocabulary.chat_template.as_deref().is_some_and(|template| template.contains("<|im_end|>")));
        let end = vocabulary.eos.unwrap();
        assert!(Tokenizer::new(vocabulary).ends_generation(end));
    }

    // Would catch: a tokenizer.json usine would run differently from its authors' read as if it did.
    #[test]
    fn what_usine_does_not_run_is_refused_by_name() {
        let json: Value = serde_json::from_str(LLAMA3_JSON).unwrap();
        let edited = |edit: &dyn Fn(&mut Value)| {
            let mut json = json.clone();
            edit(&mut json);
            from_tokenizer_json(&json.to_string(), None).unwrap_err()
        };
        assert!(edited(&|json| json["normalizer"] = serde_json::json!({"type": "NFC"})).contains("normalizer (NFC)"));
        assert!(edited(&|json| json["model"]["byte_fallback"] = true.into()).contains("byte fallback"));
        assert!(edited(&|json| json["model"]["type"] = "Unigram".into()).contains("model is Unigram"));
        let split = &|json: &mut Value| json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+".into();
        assert!(edited(split).contains("not Llama 3's or Qwen2's"));
        let gap = &|json: &mut Value| json["added_tokens"][2]["id"] = 500.into();
        assert!(edited(gap).contains("no token has id 399"));
        assert!(edited(&|json| json["model"]["dropout"] = 0.1.into()).contains("`dropout`"));
        assert!(edited(&|json| json["model"]["ignore_merges"] = false.into()).contains("`ignore_merges` false"));
        assert!(edited(&|json| json["added_tokens"][0]["lstrip"] = true.into()).contains("`lstrip`"));
        let twice = &|json: &mut Value| json["model"]["vocab"]["<tool_call>"] = 5.into();
        assert!(edited(twice).contains("no token has id") || edited(twice).contains("same text"));
        assert!(from_tokenizer_json("{", None).unwrap_err().contains("tokenizer.json"));
        let config = r#"{"eos_token": "<|nonesuch|>"}"#;
        assert!(from_tokenizer_json(LLAMA3_JSON, Some(config)).unwrap_err().contains("is no token"));
    }
}
