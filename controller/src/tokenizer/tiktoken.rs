//! `qwen.tiktoken` (base64 token, rank per line) to the Hugging Face `tokenizer.json` of the
//! same vocabulary: byte-level BPE with GPT-2's byte table (see
//! [`QwenTokenizer::from_tiktoken`](super::QwenTokenizer::from_tiktoken)).

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value};

use super::*;

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the other 68 bytes to
/// U+0100.. in byte order.
pub(super) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

/// Parses `qwen.tiktoken` and builds the `tokenizer.json` value (see
/// [`QwenTokenizer::from_tiktoken`]).
pub(super) fn tiktoken_to_tokenizer_json(path: &Path, text: &str) -> Result<Value> {
    let bad = |line: usize, message: String| TokenizerError::Tiktoken {
        path: path.to_path_buf(),
        line,
        message,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    // ranks[rank] = token bytes; rank_of[token bytes] = rank.
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut rank_of: HashMap<Vec<u8>, u32> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(tok), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(lineno, "expected `base64 rank`".into()));
        };
        let bytes = b64
            .decode(tok)
            .map_err(|e| bad(lineno, format!("bad base64: {e}")))?;
        if bytes.is_empty() {
            return Err(bad(lineno, "empty token".into()));
        }
        let rank: u32 = rank
            .parse()
            .map_err(|e| bad(lineno, format!("bad rank: {e}")))?;
        if rank_of.insert(bytes.clone(), rank).is_some() {
            return Err(bad(lineno, "duplicate token".into()));
        }
        let r = rank as usize;
        if r >= by_rank.len() {
            by_rank.resize(r + 1, None);
        }
        if by_rank[r].replace(bytes).is_some() {
            return Err(bad(lineno, format!("duplicate rank {rank}")));
        }
    }
    if by_rank.is_empty() {
        return Err(bad(0, "no tokens".into()));
    }
    let by_rank: Vec<Vec<u8>> = by_rank
        .into_iter()
        .enumerate()
        .map(|(r, t)| t.ok_or_else(|| bad(0, format!("rank {r} missing (ranks must be 0..n)"))))
        .collect::<Result<_>>()?;
    if by_rank.len() != QWEN_BPE_VOCAB_SIZE as usize {
        return Err(bad(
            0,
            format!(
                "{} tokens, expected {QWEN_BPE_VOCAB_SIZE} (Qwen's ranks)",
                by_rank.len()
            ),
        ));
    }

    let table = bytes_to_unicode();
    let to_str = |b: &[u8]| b.iter().map(|&x| table[x as usize]).collect::<String>();

    let mut vocab = serde_json::Map::with_capacity(by_rank.len());
    let mut merges: Vec<Value> = Vec::with_capacity(2 * by_rank.len());
    for (rank, tok) in by_rank.iter().enumerate() {
        vocab.insert(to_str(tok), json!(rank));
        if tok.len() < 2 {
            continue;
        }
        let mut local: Vec<(u32, u32, usize)> = (1..tok.len())
            .filter_map(|i| {
                let l = rank_of.get(&tok[..i])?;
                let r = rank_of.get(&tok[i..])?;
                Some((*l, *r, i))
            })
            .collect();
        local.sort_unstable();
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, i)| json!([to_str(&tok[..i]), to_str(&tok[i..])])),
        );
    }

    let special = |id: u32, content: String| {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    let mut added = vec![
        special(ENDOFTEXT_ID, "<|endoftext|>".into()),
        special(IM_START_ID, "<|im_start|>".into()),
        special(IM_END_ID, "<|im_end|>".into()),
    ];
    added.extend(
        (0..QWEN_EXTRA_TOKENS).map(|i| special(IM_END_ID + 1 + i, format!("<|extra_{i}|>"))),
    );

    // Mirrors the non-model parts of the Qwen1.5 checkpoints' tokenizer.json exactly.
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": QWEN_PRETOKENIZE_REGEX },
                    "behavior": "Isolated",
                    "invert": false
                },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false }
            ]
        },
        "post_processor": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": vocab,
            "merges": merges
        }
    }))
}
