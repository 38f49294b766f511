//! Tests of `faasmoe_controller::tokenizer` against the shared fixtures.
//!
//! Fixtures: `$FAASMOE_FIXTURES`, else `<workspace>/../shared/fixtures`. When they are
//! absent the fixture tests print a loud SKIPPED and pass.
//! `tokenizer-golden.json` = `[{"text": ..., "ids": [...]}]`, ids from Hugging Face's
//! Qwen1.5 tokenizer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use faasmoe_controller::completion::CompletionText;
use faasmoe_controller::tokenizer::{
    render_chat, QwenTokenizer, StreamDecoder, TokenizerError, IM_END_ID, IM_START_ID,
    QWEN_TIKTOKEN_VOCAB_SIZE,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    text: String,
    ids: Vec<u32>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixtures_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("FAASMOE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("../shared/fixtures"),
    };
    if dir.join("tokenizer-golden.json").is_file() {
        Some(dir)
    } else {
        // Written to the real stderr (not `eprintln!`, which the test harness captures)
        // so that the skip is visible in a normal `cargo test` run.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: tokenizer fixtures not found at {} (set FAASMOE_FIXTURES) ***\n",
            dir.display()
        );
        None
    }
}

fn golden(dir: &Path) -> Vec<Golden> {
    let text = std::fs::read_to_string(dir.join("tokenizer-golden.json")).unwrap();
    let g: Vec<Golden> = serde_json::from_str(&text).unwrap();
    assert_eq!(g.len(), 17, "tokenizer-golden.json should hold 17 cases");
    g
}

fn fixture_tokenizer(dir: &Path) -> QwenTokenizer {
    QwenTokenizer::from_checkpoint_dir(dir.join("qwen15-moe-tiny")).unwrap()
}

/// NFC form of `text` as the tokenizer's own normalizer produces it.
fn nfc(tok: &QwenTokenizer, text: &str) -> String {
    use tokenizers::{NormalizedString, Normalizer};
    let mut s = NormalizedString::from(text);
    tok.inner()
        .get_normalizer()
        .expect("Qwen tokenizer has a normalizer")
        .normalize(&mut s)
        .unwrap();
    s.get().to_string()
}

/// The tokenizer built from `.tools/qwen.tiktoken`, fetched by `scripts/fetch-qwen-tiktoken`
/// when missing. Built once per test binary (the conversion takes a moment).
fn tiktoken_tokenizer() -> &'static QwenTokenizer {
    static TOK: OnceLock<QwenTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let root = workspace_root();
        let path = root.join(".tools/qwen.tiktoken");
        if !path.is_file() {
            let script = root.join("scripts/fetch-qwen-tiktoken");
            let out = Command::new(&script)
                .output()
                .expect("run scripts/fetch-qwen-tiktoken");
            assert!(
                out.status.success(),
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        QwenTokenizer::from_tiktoken(&path).unwrap()
    })
}

/// (a) The fixture tokenizer.json encodes every golden text to the golden ids and decodes
/// them back to the (NFC) text.
#[test]
fn fixture_tokenizer_matches_golden_ids() {
    let Some(dir) = fixtures_dir() else { return };
    let tok = fixture_tokenizer(&dir);
    assert!(tok.has_chat_template());
    assert_eq!(tok.vocab_size(), 151_646);
    for g in golden(&dir) {
        let ids = tok.encode(&g.text).unwrap();
        assert_eq!(ids, g.ids, "encode({:?})", g.text);
        let back = tok.decode(&g.ids).unwrap();
        assert_eq!(back, nfc(&tok, &g.text), "decode(ids of {:?})", g.text);
    }
    // The NFC case really is normalised (decomposed é → precomposed).
    assert_eq!(
        tok.decode(&tok.encode("e\u{301}").unwrap()).unwrap(),
        "\u{e9}"
    );
}

/// (b) The tokenizer converted from qwen.tiktoken encodes every golden text to the golden
/// ids, decodes like the fixture, and agrees with the fixture's vocabulary.
#[test]
fn tiktoken_tokenizer_matches_golden_ids() {
    let Some(dir) = fixtures_dir() else { return };
    let tok = tiktoken_tokenizer();
    assert_eq!(tok.vocab_size(), QWEN_TIKTOKEN_VOCAB_SIZE as usize);
    assert_eq!(tok.vocab_size(), 151_851);
    for g in golden(&dir) {
        assert_eq!(tok.encode(&g.text).unwrap(), g.ids, "encode({:?})", g.text);
        assert_eq!(tok.decode(&g.ids).unwrap(), nfc(tok, &g.text));
    }
    assert_eq!(tok.token_to_id("<|extra_0|>"), Some(151_646));
    assert_eq!(tok.token_to_id("<|extra_204|>"), Some(151_850));
    assert_eq!(tok.encode("a<|extra_3|>b").unwrap(), vec![64, 151_649, 65]);

    // Same model as the fixture: vocabulary and merges (via the serialised JSON).
    let fixture = fixture_tokenizer(&dir);
    assert_eq!(
        fixture.inner().get_vocab(false),
        tok.inner().get_vocab(false),
        "BPE vocabulary differs from the fixture tokenizer.json"
    );
    let model_json = |t: &QwenTokenizer| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&t.inner().to_string(false).unwrap()).unwrap();
        v["model"]["merges"].clone()
    };
    let (a, b) = (model_json(&fixture), model_json(tok));
    assert_eq!(a.as_array().unwrap().len(), 294_166);
    assert!(a == b, "merges differ from the fixture tokenizer.json");
}

/// `save` writes a tokenizer.json that loads back to the same tokenizer.
#[test]
fn tiktoken_tokenizer_save_roundtrip() {
    let Some(dir) = fixtures_dir() else { return };
    let tok = tiktoken_tokenizer();
    let out = std::env::temp_dir().join(format!("faasmoe-tok-{}.json", std::process::id()));
    tok.save(&out).unwrap();
    let loaded = QwenTokenizer::from_file(&out).unwrap();
    std::fs::remove_file(&out).ok();
    assert_eq!(loaded.vocab_size(), 151_851);
    for g in golden(&dir) {
        assert_eq!(
            loaded.encode(&g.text).unwrap(),
            g.ids,
            "encode({:?})",
            g.text
        );
    }
}

fn stream_all(dec: &mut StreamDecoder<'_>, ids: &[u32]) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut chunks = Vec::new();
    for &id in ids {
        let piece = dec.step(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "emitted an incomplete character: {piece:?}"
        );
        out.push_str(&piece);
        chunks.push(piece);
    }
    out.push_str(&dec.finish().unwrap());
    (out, chunks)
}

/// (c) StreamDecoder fed the ids one by one concatenates to decode(ids): the CJK and
/// emoji texts (and, for good measure, all the others).
#[test]
fn stream_decoder_matches_decode() {
    let Some(dir) = fixtures_dir() else { return };
    let tok = fixture_tokenizer(&dir);
    let cases = golden(&dir);
    let is_cjk_or_emoji = |s: &str| {
        s.chars()
            .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c) || c >= '\u{1F000}')
    };
    let special = cases.iter().filter(|g| is_cjk_or_emoji(&g.text)).count();
    assert!(
        special >= 2,
        "expected CJK and emoji golden texts, found {special}"
    );
    for g in &cases {
        let full = tok.decode(&g.ids).unwrap();
        let (streamed, _) = stream_all(&mut tok.stream_decoder(), &g.ids);
        assert_eq!(streamed, full, "stream of {:?}", g.text);
        // And with special tokens skipped.
        let full = tok.decode_with(&g.ids, true).unwrap();
        let (streamed, _) = stream_all(&mut StreamDecoder::new(&tok, true), &g.ids);
        assert_eq!(streamed, full, "stream (skip special) of {:?}", g.text);
    }

    // A character split over several byte-level tokens is held back, then emitted whole.
    for text in ["🚀🦀", "用一句话解释", "ünïcödé 🚀 end"] {
        let ids = tok.encode(text).unwrap();
        let (streamed, chunks) = stream_all(&mut tok.stream_decoder(), &ids);
        assert_eq!(streamed, text);
        for c in &chunks {
            assert!(c.is_empty() || text.contains(c.as_str()));
        }
    }
    // Find a character that byte-level BPE splits over several tokens (🚀 is one token).
    let (ch, split) = ["🦀", "🫠", "𓀀", "ꙮ", "𝕏"]
        .iter()
        .map(|c| (*c, tok.encode(c).unwrap()))
        .find(|(_, ids)| ids.len() > 1)
        .expect("some candidate character spans several tokens");
    let mut dec = tok.stream_decoder();
    for &id in &split[..split.len() - 1] {
        assert_eq!(dec.step(id).unwrap(), "", "partial {ch} must be held back");
    }
    assert_eq!(dec.step(*split.last().unwrap()).unwrap(), ch);
    // A stream cut inside a character flushes a replacement character.
    let mut dec = tok.stream_decoder();
    assert_eq!(dec.step(split[0]).unwrap(), "");
    assert!(dec.finish().unwrap().contains('\u{FFFD}'));
    assert_eq!(dec.finish().unwrap(), "", "finish is idempotent");
}

/// Feeds `ids` to a [`CompletionText`] with `stops`, one by one, taking the stream delta
/// after each as a streaming reply does; returns (whole text, what was streamed including
/// the last chunk, whether a stop string matched, ids fed until it did).
fn complete(tok: &QwenTokenizer, stops: &[&str], ids: &[u32]) -> (String, String, bool, usize) {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut c = CompletionText::new(Some(tok), &stops);
    let mut streamed = String::new();
    let mut fed = 0;
    for &id in ids {
        fed += 1;
        let stopped = c.push(id).unwrap();
        let d = c.take_stream_delta();
        assert!(
            !d.contains('\u{FFFD}'),
            "streamed an incomplete character: {d:?}"
        );
        streamed.push_str(&d);
        if stopped {
            break;
        }
    }
    let stopped = c.stopped();
    let (text, tail) = c.finish();
    streamed.push_str(&tail);
    (text, streamed, stopped, fed)
}

/// CompletionText (the reply text of `Api::generate`): without stop strings the text and
/// the stream both equal the full decode (special tokens skipped); with one, both end right
/// before its first occurrence — also when it spans tokens or a multi-byte character — and
/// nothing of it is ever streamed.
#[test]
fn completion_text_stops_and_streams() {
    let Some(dir) = fixtures_dir() else { return };
    let tok = fixture_tokenizer(&dir);
    for g in &golden(&dir) {
        let full = tok.decode_with(&g.ids, true).unwrap();
        let (text, streamed, stopped, _) = complete(&tok, &[], &g.ids);
        assert_eq!(text, full, "{:?}", g.text);
        assert_eq!(streamed, full, "{:?}", g.text);
        assert!(!stopped);
    }
    let text = "The quick brown fox jumps over the lazy dog. 用一句话解释 🚀 end of the story.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode_with(&ids, true).unwrap(), text);
    for stop in [
        "fox",
        "over the",
        "lazy dog.",
        "句话",
        "🚀 end",
        "story",
        "e",
    ] {
        let pos = text.find(stop).unwrap();
        let (got, streamed, stopped, fed) = complete(&tok, &[stop, "never there"], &ids);
        assert!(stopped, "{stop:?}");
        assert_eq!(got, &text[..pos], "stop {stop:?}");
        assert_eq!(streamed, got, "stop {stop:?}: the stream");
        assert!(
            fed < ids.len() || text.ends_with(stop),
            "stop {stop:?}: ids after it fed"
        );
    }
    // The earliest of several stop strings wins.
    let (got, ..) = complete(&tok, &["lazy", "quick"], &ids);
    assert_eq!(got, "The ");
    // A stop string that never occurs: the whole text; empty stop strings are ignored.
    let (got, streamed, stopped, _) = complete(&tok, &["zebra", ""], &ids);
    assert_eq!(
        (got.as_str(), streamed.as_str(), stopped),
        (text, text, false)
    );
    // Without a tokenizer (input_ids only): no text, no stop.
    let mut c = CompletionText::new(None, &["a".to_string()]);
    for &id in &ids {
        assert!(!c.push(id).unwrap());
        assert_eq!(c.take_stream_delta(), "");
    }
    assert_eq!(c.finish(), (String::new(), String::new()));
}

/// (d) render_chat produces Qwen ChatML with the generation prompt, which tokenizes with
/// the special tokens as single ids.
#[test]
fn render_chat_chatml() {
    let msgs = [
        ("system", "You are a helpful assistant."),
        ("user", "Hello!"),
    ];
    let expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                    <|im_start|>user\nHello!<|im_end|>\n\
                    <|im_start|>assistant\n";
    assert_eq!(render_chat(&msgs), expected);
    let owned: Vec<(String, String)> = msgs
        .iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect();
    assert_eq!(render_chat(&owned), expected);
    assert_eq!(render_chat::<&str, &str>(&[]), "<|im_start|>assistant\n");

    let Some(dir) = fixtures_dir() else { return };
    let tok = fixture_tokenizer(&dir);
    assert_eq!(tok.render_chat(&msgs), expected);
    // The golden ChatML case is exactly render_chat of its messages.
    let rendered = render_chat(&[
        ("system", "You are a helpful assistant."),
        ("user", "用一句话解释什么是无服务器计算。"),
    ]);
    let g = golden(&dir)
        .into_iter()
        .find(|g| g.text == rendered)
        .expect("golden ChatML case");
    let ids = tok.encode(&rendered).unwrap();
    assert_eq!(ids, g.ids);
    assert_eq!(ids[0], IM_START_ID);
    assert_eq!(ids.iter().filter(|&&i| i == IM_END_ID).count(), 2);
}

/// Errors name the offending file.
#[test]
fn errors_are_typed() {
    let e = QwenTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(matches!(e, TokenizerError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/tokenizer.json"));
    let e = QwenTokenizer::from_checkpoint_dir("/nonexistent").unwrap_err();
    assert!(matches!(e, TokenizerError::NotFound { .. }), "{e}");

    let dir = std::env::temp_dir().join(format!("faasmoe-tok-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let e = QwenTokenizer::from_file(&bad).unwrap_err();
    assert!(matches!(e, TokenizerError::Parse { .. }), "{e}");
    assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
