//! The tokenizer part of `cargo xtask parity`: usine's tokenizers and chat templates against
//! llama.cpp's on the same GGUF files, one per vocabulary the engine's generator writes (the bytes, and
//! the project's trained `llama`- and `gpt2`-kind vocabularies under each family's pre-tokenizer and
//! template; see `engines/candle/src/tokenizer/fixtures.rs`).
//!
//! For each file, every string of [`corpus`] (over a thousand: prose and code of the project, runs of
//! spaces and line breaks, digits, mixed scripts, emoji, special tokens' texts, control and unassigned
//! characters, seeded random ones) is tokenized by both as a prompt (start token, special texts
//! parsed) and as plain text; every id must match, and usine's decoding of the plain ids must give the
//! string back wherever llama.cpp's does. Each of [`chats`] is rendered by the file's template on both
//! sides (llama.cpp's built-in template of the family) and tokenized as a prompt: the texts and ids
//! must match. Then [`SPEED_BYTES`] of mixed text is tokenized by both, [`SPEED_TURNS`] turns each,
//! and the medians are reported.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::bench_peers::run_json;

/// The vocabularies checked, as the generator names them, with what each stands for.
pub(crate) const VOCABULARIES: [(&str, &str); 7] = [
    ("bytes", "gpt2, no merges (usine's byte models)"),
    ("mistral", "llama (SentencePiece), [INST]"),
    ("llama2", "llama (SentencePiece), <<SYS>> with rules"),
    ("gpt2", "gpt2, pre gpt-2"),
    ("qwen2", "gpt2, pre qwen2, ChatML"),
    ("llama3", "gpt2, pre llama-bpe, Llama 3 headers"),
    ("smollm", "gpt2, pre smollm, ChatML"),
];
/// Bytes of the speed check's text, and its turns.
pub(crate) const SPEED_BYTES: usize = 1 << 20;
pub(crate) const SPEED_TURNS: usize = 5;

/// SplitMix64: the corpus's random strings and parity's token ids, the same on every run.
pub(crate) struct Seeded(pub(crate) u64);

impl Seeded {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n")
    }
}

/// The strings both tokenizers take: at least a thousand, the same on every run.
pub(crate) fn corpus(root: &Path) -> Result<Vec<String>> {
    let mut strings = Vec::new();
    // Prose and code: the project's own files, cut into paragraphs.
    for file in ["README.md", "ARCHITECTURE.md", "engines/candle/src/tokenizer/mod.rs", "executor/src/run.rs"] {
        let text = std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
        strings.extend(text.split("\n\n").filter(|part| !part.trim().is_empty()).take(120).map(str::to_owned));
    }
    // Spaces, tabs and line breaks, alone and around words.
    let blanks = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\n ", "\u{a0}", "\u{3000}", "\u{2028}"];
    for (i, a) in blanks.iter().enumerate() {
        for b in &blanks[i..] {
            strings.push(format!("{a}{b}"));
            strings.push(format!("word{a}{b}word"));
            strings.push(format!("{a}x{b}"));
        }
    }
    // Digits.
    let mut seeded = Seeded(16);
    for length in 1..=12 {
        let digits: String =
            (0..length).map(|_| char::from(b'0' + u8::try_from(seeded.below(10)).expect("a digit"))).collect();
        for shape in ["{}", " {}", "x{}y", "{}.5", "-{}", "{},000", "v{}", "{} items", "١٢٣{}", "{}²"] {
            strings.push(shape.replace("{}", &digits));
        }
    }
    // Mixed scripts, combining marks, emoji.
    let scripts = [
        "Ελληνικά κείμενα",
        "Русский текст",
        "中文文本测试",
        "日本語のテキスト",
        "한국어 텍스트",
        "العربية نص",
        "עברית טקסט",
        "हिन्दी पाठ",
        "ไทยข้อความ",
        "Tiếng Việt có dấu",
        "e\u{301}te\u{301}",
        "Zalgo z\u{336}\u{335}a",
        "ﬁnancial ﬂow",
        "Ａｂｃ全角",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "😀",
        "👍🏽",
        "👨‍👩‍👧‍👦",
        "🇫🇷🇯🇵",
        "❤️",
        "🧑🏻‍💻 codes",
        "mixed: Ωmega + 中 + 😀 + é",
    ];
    for a in &scripts {
        strings.push((*a).to_owned());
        strings.push(format!(" {a}"));
        for b in scripts.iter().take(6) {
            strings.push(format!("{a} {b}"));
        }
    }
    // Special tokens' texts, whole, cut, nested and beside text.
    let specials = [
        "<s>",
        "</s>",
        "<unk>",
        "[INST]",
        "[/INST]",
        "<tool>",
        "<tool_call>",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|filler_0|>",
        "<0x41>",
        "▁",
        "Ġ",
        "<|im_",
        "|>",
    ];
    for s in &specials {
        for shape in ["{}", " {}", "{} ", "a{}b", "{}{}", "<{}>", "{}\n", " {} x {} "] {
            strings.push(shape.replace("{}", s));
        }
    }
    // Control, private, unassigned and edge characters.
    let odd = [
        "\u{0}",
        "\u{1}",
        "\u{7}",
        "\u{1b}[31m",
        "\u{7f}",
        "\u{80}",
        "\u{9f}",
        "\u{ad}",
        "\u{200b}",
        "\u{200d}",
        "\u{fe0f}",
        "\u{feff}",
        "\u{fffd}",
        "\u{fffe}",
        "\u{ffff}",
        "\u{e000}",
        "\u{f8ff}",
        "\u{378}",
        "\u{e0001}",
        "\u{10ffff}",
        "\u{1f9ff}",
        "\u{2fa1d}",
        // Letters by Unicode version: 15.0 (a Cyrillic modifier), 15.1 (CJK Extension I), 16.0 (Garay,
        // unassigned to llama.cpp's tables), 17.0 (unassigned to both).
        "\u{1e030}x",
        "\u{2ebf0}\u{2ebf1}",
        "\u{10d50}\u{10d51}",
        "\u{1e5d0}\u{1e5d1}",
    ];
    for o in &odd {
        strings.push((*o).to_owned());
        strings.push(format!("a{o}b"));
        strings.push(format!(" {o} "));
    }
    // Seeded random strings over all of the above's ranges.
    let ranges: [(u32, u32); 9] = [
        (0x20, 0x7e),
        (0x0, 0x20),
        (0xa0, 0x24f),
        (0x370, 0x4ff),
        (0x600, 0x6ff),
        (0x900, 0x97f),
        (0x3040, 0x30ff),
        (0x4e00, 0x9fff),
        (0x1f300, 0x1faff),
    ];
    for _ in 0..300 {
        let length = 1 + seeded.below(24);
        let text: String = (0..length)
            .filter_map(|_| {
                let (low, high) = ranges[seeded.below(ranges.len())];
                char::from_u32(low + u32::try_from(seeded.below((high - low + 1) as usize)).expect("a small range"))
            })
            .collect();
        strings.push(text);
    }
    ensure!(strings.len() >= 1000, "the corpus holds {} strings", strings.len());
    Ok(strings)
}

/// The conversations both sides render: each template's accepted shapes (a system message or none,
/// several turns, contents with spaces to trim, line breaks, other scripts).
pub(crate) fn chats() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        vec![("user", "Hello")],
        vec![("system", "Be brief."), ("user", "What is usine?")],
        vec![("user", "  padded question  "), ("assistant", " An answer. "), ("user", "And then?")],
        vec![("system", "You answer in French."), ("user", "Bonjour"), ("assistant", "Salut !"), ("user", "Ça va ?")],
        vec![("user", "line one\nline two\n\nline four")],
        vec![("user", "中文 😀 Ελληνικά")],
        vec![("system", ""), ("user", "empty system")],
        vec![("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")],
        // Last: one that breaks the `llama2` template's rules (a system message after a user's).
        vec![("user", "a"), ("system", "a late system message")],
    ]
}

/// Appends `text` as the modes read it: a little-endian u32 length, then the bytes.
fn push_string(bytes: &mut Vec<u8>, text: &str) {
    bytes.extend(u32::try_from(text.len()).expect("short strings").to_le_bytes());
    bytes.extend_from_slice(text.as_bytes());
}

fn strings_file(strings: &[String]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for text in strings {
        push_string(&mut bytes, text);
    }
    bytes
}

/// The conversations as the `template` modes read them: a u32 count of messages, then role and
/// content as strings.
pub(crate) fn chats_file(chats: &[Vec<(&str, &str)>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for chat in chats {
        bytes.extend(u32::try_from(chat.len()).expect("short chats").to_le_bytes());
        for (role, content) in chat {
            push_string(&mut bytes, role);
            push_string(&mut bytes, content);
        }
    }
    bytes
}

/// Reads what the `tokenize` and `template` modes write.
struct Reader<'b> {
    bytes: &'b [u8],
}

impl<'b> Reader<'b> {
    fn u32(&mut self) -> Result<u32> {
        let (head, rest) = self.bytes.split_first_chunk::<4>().context("a truncated output")?;
        self.bytes = rest;
        Ok(u32::from_le_bytes(*head))
    }

    fn ids(&mut self) -> Result<Vec<u32>> {
        (0..self.u32()?).map(|_| self.u32()).collect()
    }

    fn string(&mut self) -> Result<&'b [u8]> {
        let len = usize::try_from(self.u32()?)?;
        ensure!(len <= self.bytes.len(), "a truncated output");
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(text)
    }

    fn byte(&mut self) -> Result<u8> {
        let (&byte, rest) = self.bytes.split_first().context("a truncated output")?;
        self.bytes = rest;
        Ok(byte)
    }
}

/// One string's tokens on one side.
struct Tokens {
    prompt: Vec<u32>,
    plain: Vec<u32>,
    text: Vec<u8>,
}

fn read_tokens(path: &Path, count: usize) -> Result<Vec<Tokens>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = Reader { bytes: &bytes };
    let mut out = Vec::with_capacity(count);
    while !reader.bytes.is_empty() {
        out.push(Tokens { prompt: reader.ids()?, plain: reader.ids()?, text: reader.string()?.to_vec() });
    }
    ensure!(out.len() == count, "{}: {} strings, not {count}", path.display(), out.len());
    Ok(out)
}

/// One conversation on one side: the rendered text and its ids, or the template's error.
pub(crate) type Chat = std::result::Result<(Vec<u8>, Vec<u32>), String>;

pub(crate) fn read_chats(path: &Path, count: usize) -> Result<Vec<Chat>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = Reader { bytes: &bytes };
    let mut out = Vec::with_capacity(count);
    while !reader.bytes.is_empty() {
        out.push(if reader.byte()? == 1 {
            Ok((reader.string()?.to_vec(), reader.ids()?))
        } else {
            Err(String::from_utf8_lossy(reader.string()?).into_owned())
        });
    }
    ensure!(out.len() == count, "{}: {} conversations, not {count}", path.display(), out.len());
    Ok(out)
}

/// One vocabulary's figures.
pub(crate) struct Outcome {
    pub(crate) line: String,
    pub(crate) failures: Vec<String>,
}

/// The median of `seconds` (a JSON array) and its spread, in MB/s of `bytes`.
fn speed(value: &serde_json::Value, bytes: usize) -> Result<(f64, f64, f64)> {
    let mut seconds: Vec<f64> =
        value["seconds"].as_array().context("no seconds")?.iter().filter_map(serde_json::Value::as_f64).collect();
    ensure!(!seconds.is_empty(), "no turns");
    seconds.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss, reason = "a megabyte count")]
    let rate = |s: f64| bytes as f64 / s / 1e6;
    Ok((rate(seconds[seconds.len() / 2]), rate(seconds[seconds.len() - 1]), rate(seconds[0])))
}

/// Checks `vocabulary` (one of [`VOCABULARIES`]) on its generated file.
pub(crate) fn check(
    (generator, parity, peer, work): (&Path, &Path, &Path, &Path),
    vocabulary: &str,
    strings: &[String],
    speed_text: &Path,
) -> Result<Outcome> {
    let (gguf, _) = crate::model::generated_gguf_with(generator, work, "tiny-llama", 1, "q8_0", vocabulary)?;
    let input = work.join("tokenizer-strings.bin");
    std::fs::write(&input, strings_file(strings))?;
    let (ours, theirs) =
        (work.join(format!("{vocabulary}.tokens.usine.bin")), work.join(format!("{vocabulary}.tokens.llama-cpp.bin")));
    run_json(Command::new(parity).arg("tokenize").arg(&gguf).arg(&input).arg(&ours))?;
    run_json(Command::new(peer).arg("tokenize").arg(&gguf).arg(&input).arg(&theirs))?;
    let (ours, theirs) = (read_tokens(&ours, strings.len())?, read_tokens(&theirs, strings.len())?);
    let mut failures = Vec::new();
    let (mut prompt_equal, mut plain_equal, mut their_trips, mut our_trips, mut ids) = (0, 0, 0, 0, 0);
    for ((text, ours), theirs) in strings.iter().zip(&ours).zip(&theirs) {
        ids += theirs.prompt.len() + theirs.plain.len();
        if ours.prompt == theirs.prompt {
            prompt_equal += 1;
        } else if failures.len() < 8 {
            failures.push(format!(
                "{vocabulary}: {text:?} as a prompt: usine {:?}, llama.cpp {:?}",
                ours.prompt, theirs.prompt
            ));
        }
        if ours.plain == theirs.plain {
            plain_equal += 1;
        } else if failures.len() < 8 {
            failures
                .push(format!("{vocabulary}: {text:?} as text: usine {:?}, llama.cpp {:?}", ours.plain, theirs.plain));
        }
        let trip = |side: &Tokens| side.text == text.as_bytes();
        their_trips += usize::from(trip(theirs));
        our_trips += usize::from(trip(ours));
        if trip(theirs) && !trip(ours) && failures.len() < 8 {
            failures.push(format!(
                "{vocabulary}: {text:?} decodes to itself in llama.cpp, to {:?} in usine",
                String::from_utf8_lossy(&ours.text)
            ));
        }
    }
    let chats = chats();
    let (mut rendered, mut refused, mut chat_cell) = (0, 0, "no template".to_owned());
    if vocabulary != "bytes" && vocabulary != "gpt2" {
        let input = work.join("tokenizer-chats.bin");
        std::fs::write(&input, chats_file(&chats))?;
        let (ours, theirs) = (
            work.join(format!("{vocabulary}.chats.usine.bin")),
            work.join(format!("{vocabulary}.chats.llama-cpp.bin")),
        );
        let status = Command::new(parity).arg("template").arg(&gguf).arg(&input).arg(&ours).status()?;
        ensure!(status.success(), "usine's template mode failed on {vocabulary}");
        let status = Command::new(peer).arg("template").arg(&gguf).arg(&input).arg(&theirs).status()?;
        ensure!(status.success(), "llama.cpp's template mode failed on {vocabulary}");
        let (ours, theirs) = (read_chats(&ours, chats.len())?, read_chats(&theirs, chats.len())?);
        for (index, ((chat, ours), theirs)) in chats.iter().zip(&ours).zip(&theirs).enumerate() {
            let breaks_rules = vocabulary == "llama2" && index == chats.len() - 1;
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) if ours == theirs && !breaks_rules => rendered += 1,
                // The template's own rules (llama.cpp's built-in renders what it refuses).
                (Err(_), Ok(_)) if breaks_rules => refused += 1,
                (ours, theirs) => failures.push(format!(
                    "{vocabulary}: conversation {chat:?}: usine {:?}, llama.cpp {:?}",
                    ours.as_ref().map(|(text, ids)| (String::from_utf8_lossy(text), ids)),
                    theirs.as_ref().map(|(text, ids)| (String::from_utf8_lossy(text), ids)),
                )),
            }
        }
        chat_cell = format!("{rendered}/{}", chats.len());
        if refused > 0 {
            chat_cell.push_str(&format!(" ({refused} refused by its rules)"));
        }
    }
    let turns = SPEED_TURNS.to_string();
    let ours = run_json(Command::new(parity).arg("tokenize-speed").arg(&gguf).arg(speed_text).arg(&turns))?;
    let theirs = run_json(Command::new(peer).arg("tokenize-speed").arg(&gguf).arg(speed_text).arg(&turns))?;
    let bytes = usize::try_from(std::fs::metadata(speed_text)?.len())?;
    let ((our_rate, our_low, our_high), (their_rate, their_low, their_high)) =
        (speed(&ours, bytes)?, speed(&theirs, bytes)?);
    if ours["tokens"] != theirs["tokens"] {
        failures.push(format!(
            "{vocabulary}: the speed text is {} tokens in usine, {} in llama.cpp",
            ours["tokens"], theirs["tokens"]
        ));
    }
    let n = strings.len();
    let line = format!(
        "| {vocabulary} | {n} | {prompt_equal}/{n} | {plain_equal}/{n} | {ids} | {their_trips} / {our_trips} | {chat_cell} | \
         {our_rate:.1} ({our_low:.1}–{our_high:.1}) | {their_rate:.1} ({their_low:.1}–{their_high:.1}) | {:.2} |",
        our_rate / their_rate
    );
    Ok(Outcome { line, failures })
}

/// [`SPEED_BYTES`] of the corpus's strings, repeated, written to `work`.
pub(crate) fn speed_text(strings: &[String], work: &Path) -> Result<std::path::PathBuf> {
    let mut text = String::with_capacity(SPEED_BYTES + 4096);
    'fill: loop {
        for string in strings {
            if text.len() + string.len() + 1 > SPEED_BYTES {
                break 'fill;
            }
            text.push_str(string);
            text.push('\n');
        }
    }
    if text.is_empty() {
        bail!("an empty corpus");
    }
    let path = work.join("tokenizer-speed.txt");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The table's header.
pub(crate) const HEADER: [&str; 2] = [
    "| vocabulary | strings | prompt ids equal | text ids equal | ids | decode gives the string back (llama.cpp / usine) | chats equal | usine MB/s (spread) | llama.cpp MB/s (spread) | usine ÷ llama.cpp |",
    "|---|---|---|---|---|---|---|---|---|---|",
];

/// Every how many strings of [`corpus`] `--bless` keeps for the engine's test fixture.
const FIXTURE_EVERY: usize = 12;
/// The longest string of the fixture, in characters (a paragraph's start).
const FIXTURE_CHARS: usize = 100;
/// The fixture of llama.cpp's ids, under the fixtures' folder.
pub(crate) const FIXTURE: &str = "llama-cpp-tokens.txt";

/// Writes llama.cpp's ids of a sample of the corpus, on each vocabulary's generated file, into the
/// engine's fixtures (`engines/candle/tests/it/tokens.rs` holds usine to them without llama.cpp).
pub(crate) fn bless(
    root: &Path,
    (generator, peer, work): (&Path, &Path, &Path),
    version: &str,
    folder: &Path,
) -> Result<std::path::PathBuf> {
    let strings: Vec<String> = corpus(root)?
        .into_iter()
        .step_by(FIXTURE_EVERY)
        .map(|string| string.chars().take(FIXTURE_CHARS).collect())
        .collect();
    let input = work.join("tokenizer-fixture-strings.bin");
    std::fs::write(&input, strings_file(&strings))?;
    let mut text = format!(
        "# llama.cpp's token ids (llama-cpp-2 {version}), written by `cargo xtask parity --bless`: per line, the \
         vocabulary (the generated tiny-llama file of one q8_0 layer), the string (JSON), its ids as a prompt and as \
         text.\n"
    );
    for (vocabulary, _) in VOCABULARIES {
        let (gguf, _) = crate::model::generated_gguf_with(generator, work, "tiny-llama", 1, "q8_0", vocabulary)?;
        let out = work.join(format!("{vocabulary}.fixture.llama-cpp.bin"));
        run_json(Command::new(peer).arg("tokenize").arg(&gguf).arg(&input).arg(&out))?;
        for (string, tokens) in strings.iter().zip(read_tokens(&out, strings.len())?) {
            let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            text.push_str(&format!(
                "{vocabulary}\t{}\t{}\t{}\n",
                serde_json::to_string(string)?,
                list(&tokens.prompt),
                list(&tokens.plain)
            ));
        }
    }
    let path = folder.join(FIXTURE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The trainers `cargo xtask vocab` runs, pinned: the same corpus gives the same vocabularies.
const TRAINERS: [&str; 2] = ["sentencepiece==0.2.3", "tokenizers==0.23.3"];

/// `cargo xtask vocab`: trains the two vocabularies (`xtask/vocab/train.py`) in a virtual environment
/// under `target/` with [`TRAINERS`], writing `engines/candle/vocab/`.
pub(crate) fn train(root: &Path) -> Result<std::process::ExitCode> {
    let venv = root.join("target").join("vocab-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let status = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().context("python3 -m venv")?;
        ensure!(status.success(), "python3 -m venv failed (on Debian: apt install python3-venv)");
    }
    let status = Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(TRAINERS).status()?;
    ensure!(status.success(), "pip install {} failed", TRAINERS.join(" "));
    let status = Command::new(&python).arg(root.join("xtask/vocab/train.py")).arg(root).status()?;
    ensure!(status.success(), "xtask/vocab/train.py failed");
    eprintln!("vocab: wrote engines/candle/vocab/; `cargo xtask parity --bless` then re-blesses the token fixture");
    Ok(std::process::ExitCode::SUCCESS)
}
