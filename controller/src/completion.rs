//! The text of one completion as its ids are generated: incremental detokenization
//! ([`StreamDecoder`]), stop strings, and what a stream may send so far.
//!
//! Stop strings as in the OpenAI API and vLLM: the completion ends at the earliest
//! occurrence of any of them, which is not part of the text. While streaming, text that may
//! still turn out to be the start of a stop string is held back (the last `longest stop − 1`
//! bytes), and so is an incomplete UTF-8 character (the decoder holds those ids back until a
//! later id completes them).

use crate::tokenizer::{QwenTokenizer, StreamDecoder, TokenizerError};

/// One completion's text. Feed it every generated id with [`push`](Self::push); stream
/// [`take_stream_delta`](Self::take_stream_delta) after each; [`finish`](Self::finish) gives
/// the whole text. Without a tokenizer (a controller serving `input_ids` only) the text
/// stays empty and no stop string can match.
#[derive(Debug, Clone)]
pub struct CompletionText<'a> {
    decoder: Option<StreamDecoder<'a>>,
    stops: Vec<String>,
    /// Bytes held back while streaming: the longest stop string's length − 1.
    hold: usize,
    /// The text decoded so far, cut before a stop string once one matched.
    text: String,
    /// Bytes of `text` already handed to [`take_stream_delta`](Self::take_stream_delta).
    sent: usize,
    stopped: bool,
}

impl<'a> CompletionText<'a> {
    /// A completion with no ids yet. Empty stop strings are ignored. Special tokens are
    /// skipped in the text (as the non-streaming decode of the reply).
    pub fn new(tokenizer: Option<&'a QwenTokenizer>, stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self {
            decoder: tokenizer.map(|t| StreamDecoder::new(t, true)),
            hold: stops.iter().map(|s| s.len() - 1).max().unwrap_or(0),
            stops,
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Feeds one generated id. Returns `true` when the text now contains a stop string:
    /// the text is cut before its earliest occurrence, and every later id is ignored (the
    /// caller should cancel the sequence).
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizer`] if decoding fails; the id is then not part of the text.
    pub fn push(&mut self, id: u32) -> Result<bool, TokenizerError> {
        if self.stopped {
            return Ok(true);
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(false);
        };
        let delta = decoder.step(id)?;
        if delta.is_empty() {
            return Ok(false);
        }
        // A stop string completed by this delta starts at most `hold` bytes before it.
        let mut from = self.text.len().saturating_sub(self.hold);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(&delta);
        let window = &self.text[from..];
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min()
        {
            self.text.truncate(from + pos);
            self.stopped = true;
        }
        Ok(self.stopped)
    }

    /// Whether a stop string matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text not yet taken that may be streamed now: all of it once a stop string
    /// matched, else all but the tail (`longest stop − 1` bytes, rounded down to a
    /// character) that might still become a stop string. Often empty.
    pub fn take_stream_delta(&mut self) -> String {
        let mut end = if self.stopped {
            self.text.len()
        } else {
            self.text.len().saturating_sub(self.hold)
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.sent {
            return String::new();
        }
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        delta
    }

    /// Ends the completion: the whole text — with the bytes the decoder still held back (an
    /// incomplete character at the end decodes to U+FFFD) unless a stop string matched — and
    /// its part not yet taken by [`take_stream_delta`](Self::take_stream_delta) (a stream's
    /// last chunk). If decoding the held-back ids fails, they are left out (logged): the
    /// text decoded so far is kept.
    pub fn finish(mut self) -> (String, String) {
        if !self.stopped {
            if let Some(decoder) = self.decoder.as_mut() {
                match decoder.finish() {
                    Ok(rest) => self.text.push_str(&rest),
                    Err(e) => {
                        tracing::warn!(error = %e, "decoding the last generated tokens failed")
                    }
                }
            }
        }
        let tail = self.text.get(self.sent..).unwrap_or_default().to_string();
        (self.text, tail)
    }
}
