//! Assembling a controller: settings, model loading, engine, dispatch, API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use candle_core::DType;
use faasmoe_model::{Checkpoint, ControlPlane, GenerationConfig};
use faasmoe_proto::connection::NatsArgs;
use faasmoe_proto::layout::Layout;
use faasmoe_proto::tensor::WireDType;
use tracing::info;

use crate::api::{Api, ApiSettings};
use crate::dispatch::{Dispatch, LocalDispatch, NatsDispatch, NatsDispatchSettings};
use crate::engine::{self, EngineSettings};
use crate::quota::QuotaGate;
use crate::tokenizer::QwenTokenizer;

/// Controller settings (flags, each also from the environment).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerSettings {
    /// Where NATS is and as whom to connect.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "FAASMOE_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Model id in subjects (default: the directory name, sanitised).
    #[arg(long, env = "FAASMOE_MODEL_ID")]
    pub model_id: Option<String>,
    /// Experts per function (1 … num_experts). Default: the broker's, from the deployment
    /// registry (JetStream KV bucket `faasmoe_deployments`), waiting up to
    /// `--activation-timeout-ms` for a broker to register the model. Given, it must equal the
    /// registered one (the controller refuses to start otherwise); it is used as is when no
    /// broker has registered the model (functions started by other means).
    #[arg(long, env = "FAASMOE_GRANULARITY")]
    pub granularity: Option<u32>,
    /// Serve only these tenants (private mode); default: every tenant (shared mode).
    #[arg(long, value_delimiter = ',')]
    pub tenants: Option<Vec<String>>,
    /// Compute the experts in-process instead of over NATS (local-split mode).
    #[arg(long)]
    pub local_experts: bool,
    /// Per expert request timeout, ms.
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Retries of an expert request after a timeout or instance error.
    #[arg(long, default_value_t = 2)]
    pub max_retries: u32,
    /// How long to wait for the broker to activate a function, ms.
    #[arg(long, default_value_t = 60_000)]
    pub activation_timeout_ms: u64,
    /// Wire dtype of hidden states: f32 (exact) or bf16 (half the bytes).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub wire_dtype: String,
    /// Most sequences per engine step.
    #[arg(long, default_value_t = 32)]
    pub max_batch_seqs: usize,
    /// Chunked-prefill budget: most prompt tokens per engine step while any sequence
    /// decodes (each decoding sequence adds its one token on top). Long prompts are
    /// prefilled over several steps while running sequences keep decoding; smaller values
    /// bound their TPOT more tightly, larger ones shorten a long prompt's TTFT (default
    /// measured with `faasmoe bench-prefill`: the largest budget keeping 4 decodes' TPOT p99
    /// within 3× of alone on 2 cores).
    #[arg(long, default_value_t = EngineSettings::DEFAULT_MAX_PREFILL_TOKENS)]
    pub max_prefill_tokens: usize,
    /// Most prompt tokens per engine step when no sequence is decoding (prompts prefilling
    /// alone: no TPOT to protect); the larger of this and `--max-prefill-tokens` applies.
    #[arg(long, default_value_t = EngineSettings::DEFAULT_MAX_PREFILL_TOKENS_ALONE)]
    pub max_prefill_tokens_alone: usize,
    /// Do not split steps into two pipelined micro-batches (while one waits for its
    /// experts over NATS, the other computes). With `--local-experts` steps are never split:
    /// there is no wait to hide, and a split reads every control-plane weight twice per step
    /// (measured with `faasmoe bench-prefill` on the demo checkpoint, 4 decodes: TPOT p50
    /// 100–118 ms split against 73–85 ms unsplit).
    #[arg(long)]
    pub no_pipeline: bool,
    /// Longest a generate request may run from its arrival, ms; then its sequence is
    /// cancelled and the reply carries what was generated with `finish_reason:
    /// "cancelled"`. 0: no limit.
    #[arg(long, env = "FAASMOE_MAX_REQUEST_MS", default_value_t = 600_000)]
    pub max_request_ms: u64,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Queue group of controllers (several controllers share the load).
    #[arg(long, default_value = "faasmoe-controllers")]
    pub queue_group: String,
    /// Activation ahead of the pass: at each MoE layer, apply the routers of this many later
    /// MoE layers to the current hidden states and start the functions they predict that
    /// are not warm (every remaining layer while the model is cold). 0 turns it off.
    /// Predictions never change results; a wrong one costs an activation.
    #[arg(long, env = "FAASMOE_PREFETCH_LAYERS", default_value_t = NatsDispatchSettings::DEFAULT_PREFETCH_LAYERS)]
    pub prefetch_layers: usize,
    /// Activations ahead of the pass in flight at once, at most; further predicted
    /// functions wait in a queue and start as these finish.
    #[arg(long, env = "FAASMOE_PREFETCH_MAX_IN_FLIGHT", default_value_t = NatsDispatchSettings::DEFAULT_PREFETCH_MAX_IN_FLIGHT)]
    pub prefetch_max_in_flight: usize,
    /// Serve Prometheus metrics at `http://<ADDR>/metrics` (e.g. `127.0.0.1:9101`; port 0
    /// picks a free one, logged and reported in `controller_stats`): TTFT, inter-token,
    /// end-to-end and queue histograms, token counters, running and waiting gauges,
    /// expert-function requests, bytes, retries, cold misses, activations. Off when unset.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Pass chat roles other than system, user, assistant and tool to the checkpoint's chat
    /// template (as vLLM does; the template may still refuse them) instead of answering
    /// `bad_request`.
    #[arg(long)]
    pub allow_custom_roles: bool,
}

impl ControllerSettings {
    /// The model id for subjects: `--model-id`, else [`faasmoe_proto::subject::model_id_for_dir`].
    pub fn model_id(&self) -> String {
        self.model_id
            .clone()
            .unwrap_or_else(|| faasmoe_proto::subject::model_id_for_dir(&self.model_dir))
    }
}

impl ControllerSettings {
    /// Settings from command-line flags as `faasmoe controller` takes them (without the
    /// program name), e.g. `["--model-dir", "m", "--granularity", "4"]`; environment
    /// variables fill what the flags leave out.
    ///
    /// Errors: clap's, for unknown flags, bad values or a missing `--model-dir`.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: ControllerSettings,
        }
        let args = std::iter::once(std::ffi::OsString::from("faasmoe controller"))
            .chain(flags.into_iter().map(Into::into));
        Ok(<Flags as clap::Parser>::try_parse_from(args)?.settings)
    }
}

/// A controller serving on the current tokio runtime ([`run`] in a task), aborted on drop:
/// a controller embedded in another process (tests, tools) without a process of its own.
#[derive(Debug)]
pub struct ControllerTask(tokio::task::JoinHandle<anyhow::Result<()>>);

impl ControllerTask {
    /// Spawns [`run`] with `settings` and `quota`.
    pub fn spawn(settings: ControllerSettings, quota: Arc<dyn QuotaGate>) -> Self {
        ControllerTask(tokio::spawn(run(settings, quota)))
    }

    /// Whether the controller has stopped.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Waits until the controller answers on `faasmoe.v1.generate.<tenant>` (probed with `{}`,
    /// a bad request: nothing is admitted or activated), polling every 50 ms.
    ///
    /// Errors: the controller stopped (with [`run`]'s error as the cause), or `limit` passed.
    pub async fn wait_serving(
        &mut self,
        client: &async_nats::Client,
        tenant: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let subject = faasmoe_proto::subject::generate(tenant)?;
        let t0 = std::time::Instant::now();
        loop {
            if self.0.is_finished() {
                return Err(match (&mut self.0).await {
                    Ok(Ok(())) => anyhow::anyhow!("the controller stopped before serving"),
                    Ok(Err(e)) => e.context("the controller stopped before serving"),
                    Err(e) => anyhow::anyhow!("the controller task failed before serving: {e}"),
                });
            }
            if faasmoe_proto::connection::answers(
                client,
                subject.clone(),
                b"{}",
                Duration::from_secs(2),
            )
            .await
            {
                return Ok(());
            }
            anyhow::ensure!(
                t0.elapsed() < limit,
                "the controller did not serve {subject} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the controller and waits until its task has ended.
    pub async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for ControllerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies the dispatch counters into the metrics recorder (they are kept as atomics by the
/// dispatcher; a scrape reads them here).
fn dispatch_metrics(s: &crate::dispatch::DispatchStats) {
    use faasmoe_telemetry::metrics as m;
    ::metrics::counter!(m::FUNCTION_REQUESTS).absolute(s.invocations);
    ::metrics::counter!(m::FUNCTION_BYTES_SENT).absolute(s.bytes_sent);
    ::metrics::counter!(m::FUNCTION_BYTES_RECEIVED).absolute(s.bytes_received);
    ::metrics::counter!(m::FUNCTION_RETRIES).absolute(s.retries + s.resends);
    ::metrics::counter!(m::FUNCTION_COLD_MISSES).absolute(s.cold_misses);
    ::metrics::counter!(m::ACTIVATION_REQUESTS).absolute(s.activations);
    ::metrics::counter!(m::PREDICTED_ACTIVATIONS).absolute(s.prefetches);
    ::metrics::counter!(m::PREDICTION_HITS).absolute(s.prefetch_hits);
    ::metrics::counter!(m::SPLIT_REQUESTS).absolute(s.split_requests);
    ::metrics::counter!(m::RECONNECTS).absolute(s.reconnects);
}

/// Returns the heap that loading freed to the OS. Parsing `tokenizer.json` (19 MB for Qwen's
/// 151,643 ranks) and the checkpoint's metadata allocates far more than the loaded tokenizer
/// keeps, and glibc's allocator holds freed memory in its arenas: measured with `faasmoe
/// bench` (its controller-memory section) on the demo checkpoint, an idle controller's RSS
/// was 634 MB with the tokenizer against 471 MB without it. `malloc_trim(0)` (glibc) gives
/// those pages back; elsewhere this does nothing.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The granularity of `model_id`'s functions: the broker's record in the deployment
/// registry ([`faasmoe_proto::deployment`]), checked against this checkpoint (`experts` =
/// (`num_experts`, MoE layer indices)) and `--granularity` (`flag`). With no record: `flag`
/// when given, else the registry is polled every 500 ms for up to `wait` (a broker starting
/// alongside registers within its start-up).
///
/// Errors: the record disagrees ([`faasmoe_proto::deployment::DeploymentMismatch`]), a
/// malformed record, or no record within `wait` and no `flag`.
async fn deployed_granularity(
    client: &async_nats::Client,
    model_id: &str,
    experts: (u32, &[u32]),
    flag: Option<u32>,
    wait: Duration,
) -> anyhow::Result<u32> {
    use faasmoe_proto::deployment::{lookup, RegistryError};
    let deadline = std::time::Instant::now() + wait;
    let mut waiting = false;
    loop {
        let missing = match lookup(client, model_id).await {
            Ok(Some(record)) => {
                let g = record.check(experts.0, experts.1, flag)?;
                info!(model = %model_id, granularity = g, "layout from the deployment registry");
                return Ok(g);
            }
            Ok(None) => "no record of this model".to_string(),
            Err(e @ RegistryError::Malformed { .. }) => return Err(e.into()),
            Err(e @ RegistryError::Unavailable(_)) => e.to_string(),
        };
        if let Some(g) = flag {
            tracing::warn!(model = %model_id, granularity = g, reason = %missing, "no broker has registered this model: using --granularity as given");
            return Ok(g);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no broker registered model {model_id:?} within {wait:?} ({missing}): start \
             `faasmoe-broker run` for this model on this NATS server, or give --granularity"
        );
        if !waiting {
            info!(model = %model_id, reason = %missing, "waiting for a broker to register the deployment");
            waiting = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Loads the control plane and serves generate requests until the connection ends.
pub async fn run(settings: ControllerSettings, quota: Arc<dyn QuotaGate>) -> anyhow::Result<()> {
    let model_id = settings.model_id();
    let dir = settings.model_dir.clone();
    let local = settings.local_experts;
    let client = settings.nats.connect("faasmoe-controller").await?;
    // The function layout first, from the config alone: a mismatch fails before a long load.
    let remote_layout = if local {
        None
    } else {
        let cfg = faasmoe_model::Config::from_dir(&dir)?;
        let moe: Vec<u32> = cfg.moe_layers().map(|l| l as u32).collect();
        let experts = cfg.num_experts as u32;
        let g = deployed_granularity(
            &client,
            &model_id,
            (experts, &moe),
            settings.granularity,
            Duration::from_millis(settings.activation_timeout_ms),
        )
        .await?;
        Some(Layout::new(&moe, experts, g))
    };
    let t0 = std::time::Instant::now();
    let (cp, local_backend) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        if local {
            let (cp, b) = faasmoe_model::load_local(&dir, DType::F32)?;
            Ok((cp, Some(b)))
        } else {
            let mut ckpt = Checkpoint::open(&dir, DType::F32)?;
            Ok((ControlPlane::load(&mut ckpt)?, None))
        }
    })
    .await??;
    let cfg = cp.config().clone();
    // Bytes of the weight tensors this process holds (the control plane, plus every routed
    // expert with `--local-experts`): what its resident memory is measured against.
    let weight_bytes = cp.resident_weight_bytes()
        + local_backend
            .as_ref()
            .map_or(0, |b| b.experts().weight_bytes());
    info!(model = %model_id, layers = cfg.num_hidden_layers, experts = cfg.num_experts, load_ms = t0.elapsed().as_secs_f64() * 1e3, weight_mb = weight_bytes as f64 / 1e6, local_experts = local, "control plane loaded");
    let generation = GenerationConfig::from_dir(&settings.model_dir)?;
    let eos = faasmoe_model::config::eos_token_ids(&cfg, &generation);
    let tokenizer = if settings.model_dir.join("tokenizer.json").exists() {
        Some(Arc::new(QwenTokenizer::from_checkpoint_dir(
            &settings.model_dir,
        )?))
    } else {
        tracing::warn!("no tokenizer.json: only `input_ids` requests will work");
        None
    };
    release_freed_heap();
    let controller_id = format!(
        "controller-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dispatch: Arc<dyn Dispatch> = match local_backend {
        Some(b) => Arc::new(LocalDispatch(b)),
        None => {
            NatsDispatch::connect(
                &settings.nats,
                "faasmoe-controller-dispatch",
                NatsDispatchSettings {
                    model_id: model_id.clone(),
                    layout: remote_layout.expect("computed above without --local-experts"),
                    request_timeout: Duration::from_millis(settings.request_timeout_ms),
                    max_retries: settings.max_retries,
                    activation_timeout: Duration::from_millis(settings.activation_timeout_ms),
                    wire_dtype: if settings.wire_dtype == "bf16" {
                        WireDType::BF16
                    } else {
                        WireDType::F32
                    },
                    controller_id,
                    prefetch_layers: settings.prefetch_layers,
                    prefetch_max_in_flight: settings.prefetch_max_in_flight,
                },
                cfg.hidden_size,
            )
            .await?
        }
    };
    let metrics_url = match settings.metrics_listen {
        Some(addr) => {
            let d = dispatch.clone();
            let refresh: faasmoe_telemetry::metrics::Refresh = Arc::new(move || {
                dispatch_metrics(&d.stats());
                Box::pin(async {})
            });
            let local = faasmoe_telemetry::metrics::serve(addr, Some(refresh))
                .await
                .with_context(|| format!("serving metrics on {addr} (--metrics-listen)"))?;
            Some(format!("http://{local}/metrics"))
        }
        None => None,
    };
    // Dispatch counters on request (`faasmoe.v1.admin.controller_stats`, every controller
    // answers; used by `faasmoe bench`, and by the HTTP gateway for health and models).
    {
        use futures::StreamExt;
        let (c, d, tenants, model, metrics) = (
            client.clone(),
            dispatch.clone(),
            settings.tenants.clone(),
            model_id.clone(),
            metrics_url,
        );
        let mut sub = c
            .subscribe(faasmoe_proto::subject::admin("controller_stats")?)
            .await?;
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(reply) = m.reply else { continue };
                // Only into an inbox: the controller may answer any reply subject it is given
                // (`allow_responses`), so a reply set to a KV subject would write the
                // deployment or tenant records.
                if !faasmoe_proto::subject::is_inbox(&reply) {
                    tracing::warn!(%reply, "controller_stats asked to reply outside an inbox: ignored");
                    continue;
                }
                let body = faasmoe_proto::stats::ControllerStats {
                    model: model.clone(),
                    tenants: tenants.clone(),
                    local_experts: local,
                    weight_bytes: weight_bytes as u64,
                    metrics: metrics.clone(),
                    dispatch: d.stats(),
                };
                let _ = c.publish(reply, body.encode()).await;
            }
        });
    }
    let engine = engine::spawn(
        Arc::new(cp),
        dispatch,
        EngineSettings {
            max_batch_seqs: settings.max_batch_seqs,
            max_prefill_tokens: settings.max_prefill_tokens,
            max_prefill_tokens_alone: settings.max_prefill_tokens_alone,
            pipeline: !settings.no_pipeline && !settings.local_experts,
            eos_token_ids: eos,
        },
    );
    let api = Arc::new(Api {
        client,
        engine,
        tokenizer,
        quota,
        settings: ApiSettings {
            tenants: settings.tenants.clone(),
            queue_group: settings.queue_group.clone(),
            default_max_tokens: settings.default_max_tokens,
            max_context: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            generation,
            max_request: (settings.max_request_ms > 0)
                .then(|| Duration::from_millis(settings.max_request_ms)),
            allow_custom_roles: settings.allow_custom_roles,
        },
    });
    api.serve().await
}
