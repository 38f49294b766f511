//! Locating the reference fixtures (`../shared/fixtures`, or `$FAASMOE_FIXTURES`): Hugging
//! Face checkpoints with golden outputs made by transformers, which tests compare against.

use std::path::PathBuf;

/// The environment variable that overrides the fixtures directory.
pub const FIXTURES_ENV: &str = "FAASMOE_FIXTURES";

/// The fixtures directory if it exists: `$FAASMOE_FIXTURES`, else `<workspace>/../shared/fixtures`.
/// When absent, prints a loud notice to stderr (tests then skip) and returns `None`.
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os(FIXTURES_ENV) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "!!! SKIPPED: reference fixtures not found at {} (set {FIXTURES_ENV})",
            dir.display()
        );
        None
    }
}

/// A named fixture checkpoint directory (`qwen15-moe-tiny`, `qwen2-moe-gqa-mixed`).
pub fn fixture(name: &str) -> Option<PathBuf> {
    fixtures_dir().map(|d| d.join(name)).filter(|d| d.is_dir())
}
