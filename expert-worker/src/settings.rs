//! Worker settings: flags, each also read from an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use faasmoe_proto::connection::NatsArgs;

/// One function instance: which experts, where NATS is, how to batch, when to exit.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "faasmoe-expert-worker",
    version,
    about = "A faasmoe expert function instance: serves a set of routed experts over NATS",
    long_about = "Loads only the given routed experts from a Hugging Face Qwen2-MoE checkpoint, subscribes to \
                  each expert's subject (faasmoe.v1.expert.<model>.<layer>.<expert>) in the function's queue group, \
                  batches concurrent requests from all controllers and tenants, and exits after the idle timeout \
                  (scale to zero). Announces itself as the NATS micro service `faasmoe-expert`."
)]
pub struct Settings {
    /// Where NATS is and as whom to connect.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, env = "FAASMOE_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Model id used in subjects (default: the directory name, sanitised).
    #[arg(long, env = "FAASMOE_MODEL_ID")]
    pub model_id: Option<String>,
    /// The function's experts: `LAYER:SPEC[;LAYER:SPEC]`, SPEC = `all` | `a-b` | `a,b,c`.
    #[arg(long, env = "FAASMOE_EXPERTS")]
    pub experts: String,
    /// Function id (the queue group); default derived from the experts (`l<layer>-e<a>-<b>`).
    #[arg(long, env = "FAASMOE_FUNCTION_ID")]
    pub function_id: Option<String>,
    /// Instance id (default: random).
    #[arg(long, env = "FAASMOE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Exit after this many ms without a request (0: never).
    #[arg(long, env = "FAASMOE_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// Batching window: most token rows in one computation.
    #[arg(long, env = "FAASMOE_BATCH_MAX_TOKENS", default_value_t = 1024)]
    pub batch_max_tokens: usize,
    /// Batching window: longest wait for more requests after the first, µs. 0 (the
    /// default) waits for nothing: a batch is whatever has arrived by the time the previous
    /// computation ends, so batches grow with load and an idle function adds no delay.
    #[arg(long, env = "FAASMOE_BATCH_MAX_WAIT_US", default_value_t = 0)]
    pub batch_max_wait_us: u64,
    /// Largest request body accepted, bytes.
    #[arg(long, env = "FAASMOE_MAX_REQUEST_BYTES", default_value_t = 8 << 20)]
    pub max_request_bytes: usize,
}

impl Settings {
    /// The idle timeout, `None` when disabled.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }

    /// The model id for subjects: `--model-id`, else [`faasmoe_proto::subject::model_id_for_dir`].
    pub fn model_id(&self) -> String {
        self.model_id
            .clone()
            .unwrap_or_else(|| faasmoe_proto::subject::model_id_for_dir(&self.model_dir))
    }
}
