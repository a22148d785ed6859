"""Trains the small vocabularies the tokenizer tests and generated models use, on the project's own
text: a `llama`-kind one (SentencePiece BPE with byte fallback) and a `gpt2`-kind one (byte-level BPE),
written as engines/candle/vocab/{llama,gpt2}.json (tokens, scores, GGUF token types, merges); and two
Hugging Face tokenizer.json files with their tokenizer_config.json, for the engine's reader of them:
`hf-bytes` (the 256 bytes and one special token: what usine's byte-level weights can take) and
`hf-llama3` (Llama 3's split, 400 tokens), with Hugging Face's own ids of a few strings
(hf-llama3.expected.json). Run by `cargo xtask vocab`, which pins the trainers' versions."""

import json
import os
import subprocess
import sys
import tempfile

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SIZE = 4000
ROOT = sys.argv[1]
OUT = os.path.join(ROOT, "engines", "candle", "vocab")

# GGUF token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


# The project's text as it stood before the vocabularies were added: the same corpus on every run.
REVISION = "0338f8267da43f9caf78b385f7058ee10b865378"


def corpus(work):
    """The Rust and Markdown files of REVISION, in a stable order, written under `work`."""
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", REVISION], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    files = []
    for index, name in enumerate(sorted(listed.stdout.split("\n"))):
        if not (name.endswith(".rs") or name.endswith(".md")):
            continue
        text = subprocess.run(["git", "show", f"{REVISION}:{name}"], cwd=ROOT, capture_output=True, check=True).stdout
        path = os.path.join(work, f"{index:05}.txt")
        with open(path, "wb") as out:
            out.write(text)
        files.append(path)
    return files


def llama(files, work):
    joined = os.path.join(work, "corpus.txt")
    with open(joined, "w", encoding="utf-8") as out:
        for name in files:
            with open(name, encoding="utf-8") as text:
                out.write(text.read())
    control = ["[INST]", "[/INST]"]
    user_defined = ["<tool>"]
    spm.SentencePieceTrainer.train(
        input=joined,
        model_prefix=os.path.join(work, "llama"),
        vocab_size=SIZE,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        max_sentence_length=1 << 20,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=control,
        user_defined_symbols=user_defined,
        num_threads=1,
        minloglevel=2,
    )
    model = spm.SentencePieceProcessor(model_file=os.path.join(work, "llama.model"))
    tokens, scores, types = [], [], []
    for i in range(model.get_piece_size()):
        piece = model.id_to_piece(i)
        tokens.append(piece)
        scores.append(model.get_score(i))
        if model.is_unknown(i):
            types.append(UNKNOWN)
        elif model.is_control(i):
            types.append(CONTROL)
        elif model.is_byte(i):
            types.append(BYTE)
        elif piece in user_defined:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    return {"tokens": tokens, "scores": scores, "types": types, "merges": []}


def gpt2(files):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SIZE - 1,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train(files, trainer)
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False)])
    saved = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    types = [CONTROL if text in special else USER_DEFINED if text == "<tool_call>" else NORMAL for text in tokens]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in saved["model"]["merges"]]
    return {"tokens": tokens, "scores": [0.0] * len(tokens), "types": types, "merges": merges}


LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# The strings whose Hugging Face ids the engine's test holds its reading of hf-llama3 to.
EXPECTED = ["Hello world", "The kernel's 12345 tokens\n\nend", "  two  spaces", "fn main() {\n    x += 1;\n}",
            "I'M HERE, we'll see", "中文 😀 Ελληνικά é", "<tool_call> <|eot_id|>", "3.14159 1,000,000", "\t\ttabs"]


def hugging_face(files):
    small = {}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    template = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|im_end|>' }}" \
               "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    small["hf-bytes"] = (tokenizer, {"eos_token": "<|im_end|>", "chat_template": template})

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=399, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tokenizer.train(files, trainer)
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False)])
    small["hf-llama3"] = (tokenizer, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    expected = {"strings": EXPECTED, "ids": [tokenizer.encode(text, add_special_tokens=False).ids for text in EXPECTED]}
    return small, expected


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        files = corpus(work)
        vocabularies = {"llama": llama(files, work), "gpt2": gpt2(files)}
        small, expected = hugging_face(files)
    for name, (tokenizer, config) in small.items():
        tokenizer.save(os.path.join(OUT, f"{name}.tokenizer.json"))
        with open(os.path.join(OUT, f"{name}.tokenizer_config.json"), "w", encoding="utf-8") as out:
            json.dump(config, out, ensure_ascii=False, indent=1)
            out.write("\n")
        print(f"{name}: {tokenizer.get_vocab_size()} tokens")
    with open(os.path.join(OUT, "hf-llama3.expected.json"), "w", encoding="utf-8") as out:
        json.dump(expected, out, ensure_ascii=False)
        out.write("\n")
    for name, vocabulary in vocabularies.items():
        with open(os.path.join(OUT, f"{name}.json"), "w", encoding="utf-8") as out:
            json.dump(vocabulary, out, ensure_ascii=False, separators=(",", ":"))
            out.write("\n")
        print(f"{name}: {len(vocabulary['tokens'])} tokens, {len(vocabulary['merges'])} merges")


main()
