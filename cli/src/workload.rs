//! Replaying the Azure LLM inference traces (Splitwise, ISCA 2024; CC-BY 4.0): arrival times,
//! prompt and output token counts, scaled to this machine; prompts of the recorded length cut
//! from a text corpus with the real tokenizer.

use std::time::Duration;

use anyhow::Context;

/// The conversation trace (first 500 requests).
pub const CONV_TRACE: &str = include_str!("../data/azure-llm-2023-conv-head500.csv");
/// The code-completion trace (first 500 requests).
pub const CODE_TRACE: &str = include_str!("../data/azure-llm-2023-code-head500.csv");
/// Prompt text.
pub const CORPUS: &str = include_str!("../data/corpus.txt");

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    /// Seconds since the first row of the replayed slice.
    pub at_s: f64,
    /// Prompt tokens recorded.
    pub context_tokens: u32,
    /// Output tokens recorded.
    pub generated_tokens: u32,
}

/// The `--prompt-div`, `--output-div` and `--time-mul` flags of the demo and the bench.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ScaleArgs {
    /// Prompt tokens of the trace are divided by this.
    #[arg(long, default_value_t = 16.0)]
    pub prompt_div: f64,
    /// Output tokens of the trace are divided by this.
    #[arg(long, default_value_t = 8.0)]
    pub output_div: f64,
    /// Inter-arrival times of the trace are multiplied by this.
    #[arg(long, default_value_t = 1.0)]
    pub time_mul: f64,
}

impl ScaleArgs {
    /// The [`Scale`] with these factors and the given clamps of scaled token counts.
    pub fn with_ranges(&self, prompt_range: (u32, u32), output_range: (u32, u32)) -> Scale {
        Scale {
            prompt_div: self.prompt_div,
            output_div: self.output_div,
            time_mul: self.time_mul,
            prompt_range,
            output_range,
        }
    }
}

/// How a trace is shrunk to fit: counts divided, clamped; time multiplied.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Scale {
    /// Prompt tokens are divided by this.
    pub prompt_div: f64,
    /// Output tokens are divided by this.
    pub output_div: f64,
    /// Inter-arrival times are multiplied by this.
    pub time_mul: f64,
    /// Bounds of scaled prompt tokens.
    pub prompt_range: (u32, u32),
    /// Bounds of scaled output tokens.
    pub output_range: (u32, u32),
}

fn parse_ts(s: &str) -> anyhow::Result<f64> {
    // "2023-11-16 18:15:46.6805900": seconds within the day are enough for deltas.
    let time = s.split(' ').nth(1).context("timestamp without time")?;
    let mut parts = time.split(':');
    let h: f64 = parts.next().context("hour")?.parse()?;
    let m: f64 = parts.next().context("minute")?.parse()?;
    let sec: f64 = parts.next().context("second")?.parse()?;
    Ok(h * 3600.0 + m * 60.0 + sec)
}

/// Reads `n` rows from `skip` on, scaled.
pub fn load(csv_text: &str, skip: usize, n: usize, scale: &Scale) -> anyhow::Result<Vec<TraceRow>> {
    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    let mut rows = Vec::new();
    let mut t0 = None;
    for rec in rdr.records().skip(skip).take(n) {
        let rec = rec?;
        let t = parse_ts(&rec[0])?;
        let t0 = *t0.get_or_insert(t);
        let ctx: f64 = rec[1].trim().parse()?;
        let gen: f64 = rec[2].trim().parse()?;
        rows.push(TraceRow {
            at_s: (t - t0) * scale.time_mul,
            context_tokens: ((ctx / scale.prompt_div).round() as u32)
                .clamp(scale.prompt_range.0, scale.prompt_range.1),
            generated_tokens: ((gen / scale.output_div).round() as u32)
                .clamp(scale.output_range.0, scale.output_range.1),
        });
    }
    anyhow::ensure!(
        rows.len() == n,
        "trace has only {} rows from {skip}",
        rows.len()
    );
    Ok(rows)
}

/// A prompt of about `tokens` tokens: a window of the corpus' token ids from `offset`,
/// decoded to text.
pub fn prompt_text(
    corpus_ids: &[u32],
    offset: usize,
    tokens: usize,
    decode: impl Fn(&[u32]) -> String,
) -> String {
    let n = corpus_ids.len();
    let ids: Vec<u32> = (0..tokens).map(|i| corpus_ids[(offset + i) % n]).collect();
    decode(&ids)
}

/// Sleeps until `at_s` after `start`.
pub async fn sleep_until(start: tokio::time::Instant, at_s: f64) {
    tokio::time::sleep_until(start + Duration::from_secs_f64(at_s)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_parse_and_scale() {
        let s = Scale {
            prompt_div: 8.0,
            output_div: 4.0,
            time_mul: 0.5,
            prompt_range: (8, 128),
            output_range: (4, 32),
        };
        let rows = load(CONV_TRACE, 0, 4, &s).unwrap();
        assert_eq!(rows[0].at_s, 0.0);
        // 374 / 8 = 46.75 → 47; 44 / 4 = 11
        assert_eq!((rows[0].context_tokens, rows[0].generated_tokens), (47, 11));
        assert!((rows[1].at_s - (50.9951690 - 46.6805900) * 0.5).abs() < 1e-6);
        assert!(load(CODE_TRACE, 0, 500, &s).is_ok());
        assert!(load(CODE_TRACE, 0, 501, &s).is_err());
    }
}
