//! Qwen (Qwen1.5 / Qwen2 / Qwen2-MoE) tokenizer for the controller.
//!
//! [`QwenTokenizer`] wraps a Hugging Face [`tokenizers::Tokenizer`] and can be built
//!
//! * from a checkpoint's `tokenizer.json` ([`QwenTokenizer::from_file`],
//!   [`QwenTokenizer::from_checkpoint_dir`]), or
//! * from Qwen's original BPE ranks file `qwen.tiktoken` ([`QwenTokenizer::from_tiktoken`]),
//!   reproducing the tiktoken → Hugging Face conversion of transformers'
//!   `convert_slow_tokenizer.TikTokenConverter` (the result is identical, vocabulary and
//!   merge list, to the `tokenizer.json` shipped with Qwen1.5 checkpoints). The ranks file
//!   can be fetched with `scripts/fetch-qwen-tiktoken` (into `.tools/qwen.tiktoken`).
//!
//! Token ids are `u32` indices into the model's embedding table. Text is Rust `String`
//! (UTF-8); the tokenizer NFC-normalises input before splitting, so `decode(encode(s))`
//! returns the NFC form of `s`.
//!
//! Also here: [`StreamDecoder`], an incremental detokenizer for streaming generation, and
//! [`render_chat`], Qwen's ChatML prompt format.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;
use tokenizers::Tokenizer;

mod tiktoken;

#[cfg(test)]
use tiktoken::bytes_to_unicode;
use tiktoken::tiktoken_to_tokenizer_json;

/// Id of `<|endoftext|>`: end of document; Qwen's `eos_token` and `pad_token` in
/// `tokenizer_config.json`, and an EOS id in `generation_config.json`.
pub const ENDOFTEXT_ID: u32 = 151_643;
/// Id of `<|im_start|>`, which opens a ChatML message.
pub const IM_START_ID: u32 = 151_644;
/// Id of `<|im_end|>`, which closes a ChatML message (the chat models' stop token).
pub const IM_END_ID: u32 = 151_645;
/// Number of ordinary (byte-level BPE) tokens in Qwen's vocabulary: ids `0..151643`,
/// i.e. the number of lines of `qwen.tiktoken`.
pub const QWEN_BPE_VOCAB_SIZE: u32 = 151_643;
/// Number of `<|extra_N|>` reserved special tokens added by [`QwenTokenizer::from_tiktoken`]
/// (`<|extra_0|>` = 151646 … `<|extra_204|>` = 151850), as in Qwen's original
/// `tokenization_qwen.py`.
pub const QWEN_EXTRA_TOKENS: u32 = 205;
/// Vocabulary size of the tokenizer built by [`QwenTokenizer::from_tiktoken`]:
/// 151643 BPE tokens + 3 named specials + 205 extras = 151851. (The models' embedding
/// tables have 151936 rows; the rows beyond the vocabulary are padding.)
pub const QWEN_TIKTOKEN_VOCAB_SIZE: u32 = QWEN_BPE_VOCAB_SIZE + 3 + QWEN_EXTRA_TOKENS;

/// Qwen's pre-tokenization regex, verbatim from Qwen's `tokenization_qwen.py` (`PAT_STR`)
/// and the `Split` pre-tokenizer of the Qwen1.5/Qwen2 `tokenizer.json` files. It is a
/// variant of the `cl100k_base` pattern that splits digits one by one (`\p{N}`).
pub const QWEN_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors of this module. Every variant that concerns a file names its path.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required file (`tokenizer.json`, `qwen.tiktoken`) does not exist.
    #[error("tokenizer file not found: {}", path.display())]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but could not be read (permissions, I/O error, …).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are not a valid tokenizer / tokenizer config
    /// (invalid JSON, unknown tokenizer component, …).
    #[error("cannot parse {}: {message}", path.display())]
    Parse {
        /// The file being parsed.
        path: PathBuf,
        /// What the parser reported.
        message: String,
    },
    /// A line of a `qwen.tiktoken` ranks file is malformed (not `base64 rank`, bad
    /// base64, duplicate token or rank, or ranks that are not exactly `0..n`).
    #[error("invalid tiktoken ranks file {}, line {line}: {message}", path.display())]
    Tiktoken {
        /// The ranks file.
        path: PathBuf,
        /// 1-based line number (0 when the problem concerns the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Writing `tokenizer.json` failed.
    #[error("cannot write {}: {message}", path.display())]
    Save {
        /// The destination file.
        path: PathBuf,
        /// What the writer reported.
        message: String,
    },
    /// Encoding or decoding failed inside the `tokenizers` library.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or to render (e.g. `raise_exception` on an
    /// unknown role): the message is the template's.
    #[error("chat template: {0}")]
    Template(String),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A Qwen byte-level BPE tokenizer (a wrapper around [`tokenizers::Tokenizer`]).
///
/// Special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, and `<|extra_N|>`
/// where present) written literally in the input text are recognised by
/// [`encode`](Self::encode) and become their single ids. No BOS/EOS is added (Qwen has
/// no BOS token), matching Hugging Face's `tokenizer.encode(text)`.
///
/// Cheap to share: wrap it in an `Arc`; all methods take `&self`.
#[derive(Clone)]
pub struct QwenTokenizer {
    inner: Tokenizer,
    has_chat_template: bool,
    /// The checkpoint's Jinja `chat_template` (`tokenizer_config.json`), if any.
    chat_template: Option<String>,
    /// Bytes of text the longest vocabulary entry stands for (see [`Self::max_token_bytes`]).
    max_token_bytes: usize,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.has_chat_template)
            .finish()
    }
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TokenizerError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn tok_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Tokenizer(e.to_string())
}

impl QwenTokenizer {
    /// Loads a Hugging Face `tokenizer.json` file.
    ///
    /// The result reports [`has_chat_template`](Self::has_chat_template) `false`; use
    /// [`from_checkpoint_dir`](Self::from_checkpoint_dir) to also look at
    /// `tokenizer_config.json`.
    ///
    /// # Errors
    /// [`TokenizerError::NotFound`] if the file does not exist, [`TokenizerError::Io`] if
    /// it cannot be read, [`TokenizerError::Parse`] (naming the path) if it is not a
    /// valid `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_file(path)?;
        let inner = Tokenizer::from_str(&text).map_err(|e| TokenizerError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self::from_tokenizer(inner, false))
    }

    /// Loads the tokenizer of a Hugging Face checkpoint directory: `<dir>/tokenizer.json`,
    /// plus `<dir>/tokenizer_config.json` (optional) only to learn whether the checkpoint
    /// declares a `chat_template` (see [`has_chat_template`](Self::has_chat_template)).
    /// The template itself is not interpreted: [`render_chat`](Self::render_chat) always
    /// produces Qwen's ChatML, which is what the Qwen checkpoints' templates produce.
    ///
    /// # Errors
    /// As [`from_file`](Self::from_file) for `tokenizer.json`; for an existing
    /// `tokenizer_config.json`, [`TokenizerError::Io`] or [`TokenizerError::Parse`]
    /// (invalid JSON) naming that file. A missing `tokenizer_config.json` is not an error.
    pub fn from_checkpoint_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        tok.has_chat_template = match read_file(&config_path) {
            Ok(text) => {
                let config: Value =
                    serde_json::from_str(&text).map_err(|e| TokenizerError::Parse {
                        path: config_path.clone(),
                        message: e.to_string(),
                    })?;
                tok.chat_template = chat_template_of(&config);
                tok.chat_template.is_some()
            }
            Err(TokenizerError::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        Ok(tok)
    }

    /// Builds the tokenizer from Qwen's BPE ranks file `qwen.tiktoken` (151643 lines
    /// `base64(token_bytes) rank`; fetch it with `scripts/fetch-qwen-tiktoken`).
    ///
    /// The conversion is that of transformers' `convert_slow_tokenizer.TikTokenConverter`
    /// (`generate_vocab_and_merges`), and yields the same model as the `tokenizer.json`
    /// of the Qwen1.5 checkpoints:
    ///
    /// * model: byte-level BPE, `vocab[bytes_to_unicode(token)] = rank`, where
    ///   `bytes_to_unicode` is GPT-2's byte → printable-char table; `ignore_merges: true`
    ///   (a pre-token that is itself in the vocabulary is taken whole, as tiktoken does);
    /// * merges: for every multi-byte token, in rank order, every split `(left, right)` of
    ///   its bytes with both halves in the vocabulary, ordered within a token by
    ///   `(rank(left), rank(right))`;
    /// * normalizer NFC; pre-tokenizer `Split(`[`QWEN_PRETOKENIZE_REGEX`]`, Isolated)`
    ///   then `ByteLevel(add_prefix_space=false, use_regex=false)`; ByteLevel
    ///   post-processor (adds nothing) and decoder;
    /// * special tokens `<|endoftext|>`=151643, `<|im_start|>`=151644, `<|im_end|>`=151645
    ///   and `<|extra_0|>`..`<|extra_204|>` = 151646..151850, so
    ///   [`vocab_size`](Self::vocab_size) is [`QWEN_TIKTOKEN_VOCAB_SIZE`] (151851). (The
    ///   checkpoints' `tokenizer.json` lists only the first three; the extras never occur
    ///   in ordinary text, they only make `<|extra_N|>` literals encode to one id.)
    ///
    /// [`has_chat_template`](Self::has_chat_template) is `false`.
    ///
    /// # Errors
    /// [`TokenizerError::NotFound`] / [`TokenizerError::Io`] for the file,
    /// [`TokenizerError::Tiktoken`] for malformed content.
    pub fn from_tiktoken(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_file(path)?;
        let json = tiktoken_to_tokenizer_json(path, &text)?;
        let inner = Tokenizer::from_str(&json.to_string()).map_err(|e| TokenizerError::Parse {
            path: path.to_path_buf(),
            message: format!("converted tokenizer rejected: {e}"),
        })?;
        Ok(Self::from_tokenizer(inner, false))
    }

    /// Wraps an already built [`tokenizers::Tokenizer`] (assumed to be a Qwen tokenizer).
    pub fn from_tokenizer(inner: Tokenizer, has_chat_template: bool) -> Self {
        // Byte-level BPE spells each byte of a token as one character; an added (special)
        // token is its content. Either way the text's bytes are at most the spelling's
        // UTF-8 bytes.
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            inner,
            has_chat_template,
            chat_template: None,
            max_token_bytes,
        }
    }

    /// The most bytes of input text one token can cover (the longest vocabulary entry,
    /// in bytes of its spelling, an upper bound): a text of more than
    /// `max_tokens × max_token_bytes()` bytes encodes to more than `max_tokens` tokens,
    /// so it can be refused without being tokenized.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Writes the tokenizer as a (pretty-printed) Hugging Face `tokenizer.json`, loadable
    /// with [`from_file`](Self::from_file) or by Python `tokenizers`/`transformers`.
    ///
    /// # Errors
    /// [`TokenizerError::Save`] naming the path.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::Save {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// Encodes `text` to token ids. Special tokens written in the text are recognised;
    /// nothing is prepended or appended (Hugging Face `encode(text)` semantics; Qwen adds
    /// no BOS). The text is NFC-normalised first. `""` encodes to `[]`.
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if the `tokenizers` library fails (not expected for
    /// byte-level BPE, which can encode any string).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens as their literal text (Hugging Face's
    /// default `skip_special_tokens=False`). Byte sequences that are not valid UTF-8 are
    /// replaced by U+FFFD. Ids outside the vocabulary are ignored.
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if the `tokenizers` library fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Like [`decode`](Self::decode), with the choice to drop special tokens
    /// (`skip_special_tokens = true`: `<|im_end|>` etc. produce no text).
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if the `tokenizers` library fails.
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// A new incremental detokenizer over this tokenizer (special tokens kept as text,
    /// as [`decode`](Self::decode)); see [`StreamDecoder`].
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, false)
    }

    /// Renders a conversation in Qwen's ChatML with the generation prompt; see the free
    /// function [`render_chat`]. The result is meant for [`encode`](Self::encode).
    pub fn render_chat<R: AsRef<str>, C: AsRef<str>>(&self, messages: &[(R, C)]) -> String {
        render_chat(messages)
    }

    /// Uses `template` (Jinja, as in `tokenizer_config.json`) for [`render_messages`]
    /// (`None`: ChatML).
    ///
    /// [`render_messages`]: Self::render_messages
    pub fn with_chat_template(mut self, template: Option<String>) -> Self {
        self.has_chat_template = template.is_some();
        self.chat_template = template;
        self
    }

    /// Renders a conversation for the model with the checkpoint's `chat_template` through
    /// minijinja, as transformers' `apply_chat_template(add_generation_prompt=True)` does
    /// (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `bos_token`/`eos_token`
    /// undefined-safe); without a template, Qwen's ChatML ([`render_chat`]).
    ///
    /// Errors: [`TokenizerError::Template`] with the template's message (a syntax error,
    /// `raise_exception(...)`).
    pub fn render_messages<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Ok(render_chat(messages));
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let tmpl = env
            .template_from_str(template)
            .map_err(|e| TokenizerError::Template(template_message(&e)))?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|(r, c)| minijinja::context! { role => r.as_ref(), content => c.as_ref() })
            .collect();
        tmpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => "",
            eos_token => "<|endoftext|>",
        })
        .map_err(|e| TokenizerError::Template(template_message(&e)))
    }

    /// Whether the checkpoint's `tokenizer_config.json` declares a `chat_template`
    /// (only known when built by [`from_checkpoint_dir`](Self::from_checkpoint_dir)).
    pub fn has_chat_template(&self) -> bool {
        self.has_chat_template
    }

    /// Number of token ids the tokenizer knows, special tokens included (151646 for the
    /// Qwen1.5 `tokenizer.json`, 151851 for [`from_tiktoken`](Self::from_tiktoken)).
    /// Not the model's embedding row count (151936).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given in its vocabulary spelling (byte-level characters, e.g.
    /// `"Ġthe"`, or a special token such as `"<|im_end|>"`), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of an id (byte-level characters or special token), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped [`tokenizers::Tokenizer`].
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer for streaming generation: fed one generated id at a time, it
/// returns the text those ids newly completed.
///
/// A single byte-level token can hold part of a UTF-8 character (CJK, emoji), so the text
/// of a token is not always printable on its own. This uses the prefix-offset method of
/// Hugging Face TGI / vLLM: it decodes the ids from `prefix_offset` (where the previous
/// emitted chunk began) to the end, and emits the part beyond the previously decoded text
/// only when that is longer and does not end in U+FFFD (an incomplete character);
/// otherwise it holds the new bytes back until a later id completes them.
///
/// Concatenating every [`step`](Self::step) result and then [`finish`](Self::finish)
/// equals decoding all the ids at once with the same `skip_special_tokens`.
///
/// Memory grows with the ids fed (they are kept); each step decodes only a short tail.
#[derive(Debug, Clone)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a QwenTokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> StreamDecoder<'a> {
    /// A new decoder with no ids yet. `skip_special_tokens` as in
    /// [`QwenTokenizer::decode_with`].
    pub fn new(tokenizer: &'a QwenTokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The decodes of the held-back window, `ids[prefix_offset..read_offset]`, and of
    /// everything from `prefix_offset`: their difference is the new text.
    fn texts(&self) -> Result<(String, String)> {
        let prefix = self.tokenizer.decode_with(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let all = self
            .tokenizer
            .decode_with(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, all))
    }

    /// Feeds one id; returns the newly completed text (`""` when the id's bytes are held
    /// back because they end in an incomplete UTF-8 character, or when it decodes to
    /// nothing, e.g. a skipped special token).
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if decoding fails.
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.texts()?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            if let Some(delta) = new_text
                .strip_prefix(prefix_text.as_str())
                .or_else(|| new_text.get(prefix_text.len()..))
            {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Ends the stream: returns the text still held back (incomplete bytes decode to
    /// U+FFFD here), so that the concatenation of all outputs equals the full decode.
    /// The decoder can keep being used afterwards.
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if decoding fails.
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.texts()?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(match new_text.strip_prefix(prefix_text.as_str()) {
            Some(delta) => delta.to_string(),
            None => new_text
                .get(prefix_text.len()..)
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// All ids fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Renders a conversation as Qwen ChatML, ending with the assistant generation prompt:
/// for each `(role, content)` in order `<|im_start|>{role}\n{content}<|im_end|>\n`, then
/// `<|im_start|>assistant\n`. This is exactly what the Qwen1.5/Qwen2 checkpoints'
/// `chat_template` produces with `add_generation_prompt=True` (no default system message
/// is inserted). Roles are conventionally `system`, `user`, `assistant`; contents are
/// copied verbatim.
pub fn render_chat<R: AsRef<str>, C: AsRef<str>>(messages: &[(R, C)]) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        out.push_str("<|im_start|>");
        out.push_str(role.as_ref());
        out.push('\n');
        out.push_str(content.as_ref());
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// The `chat_template` of a `tokenizer_config.json`: a string, or a list of
/// `{"name", "template"}` of which the one named `default` (else the first) is used.
fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

/// A minijinja error's message without its template-name decoration: the message a
/// template raised (`raise_exception`) as it is.
fn template_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == minijinja::ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_to_unicode_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn render_chat_chatml() {
        assert_eq!(
            render_chat(&[("user", "hi")]),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(render_chat::<&str, &str>(&[]), "<|im_start|>assistant\n");
    }

    #[test]
    fn tiktoken_errors_name_path_and_line() {
        let p = Path::new("x.tiktoken");
        let e = tiktoken_to_tokenizer_json(p, "IQ== 0\nnot-base64!! 1\n").unwrap_err();
        assert!(matches!(e, TokenizerError::Tiktoken { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("x.tiktoken"));
        let e = QwenTokenizer::from_tiktoken("/nonexistent/qwen.tiktoken").unwrap_err();
        assert!(matches!(e, TokenizerError::NotFound { .. }), "{e}");
    }
}
