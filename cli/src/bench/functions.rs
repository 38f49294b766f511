//! The faasmoe-shared side of the decode section: a nats-server, the broker at one
//! granularity with its expert workers (real processes, started as `faasmoe up` starts them)
//! and the controller's own dispatcher ([`NatsDispatch`]) in the bench process. Its decode
//! steps run through [`faasmoe_controller::engine::forward_batch`], the code every engine
//! step runs, over the same control plane as local-split's: the two modes differ only in
//! where the routed experts are computed.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use candle_core::Tensor;
use faasmoe_broker::{EmbeddedServer, InternalCredentials};
use faasmoe_controller::dispatch::{
    Dispatch, DispatchContext, DispatchError, DispatchStats, NatsDispatch, NatsDispatchSettings,
};
use faasmoe_model::{Config, RoutedBatch};
use faasmoe_proto::layout::Layout;
use faasmoe_proto::tensor::WireDType;
use futures::future::BoxFuture;
use tokio::process::Child;

/// How long the broker may take to answer its activation subject after it was started.
const BROKER_START: Duration = Duration::from_secs(120);
/// How long a cold function may take to start (the warm-up step pays it): a worker of 60
/// A2.7B experts maps 1 GB.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(180);

/// A dispatch that records the distinct `(decoder layer, expert)` pairs it is asked for.
pub(super) struct Touched<'a> {
    inner: &'a dyn Dispatch,
    seen: Mutex<BTreeSet<(usize, usize)>>,
}

impl<'a> Touched<'a> {
    pub(super) fn new(inner: &'a dyn Dispatch) -> Self {
        Self {
            inner,
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    /// Distinct `(layer, expert)` pairs routed to so far.
    pub(super) fn count(&self) -> usize {
        self.seen.lock().expect("not poisoned").len()
    }
}

impl Dispatch for Touched<'_> {
    fn routed<'b>(
        &'b self,
        batch: &'b RoutedBatch,
        ctx: &'b DispatchContext,
    ) -> BoxFuture<'b, Result<Tensor, DispatchError>> {
        {
            let mut seen = self.seen.lock().expect("not poisoned");
            for r in &batch.routes {
                seen.extend(r.iter().map(|&(e, _)| (batch.layer, e)));
            }
        }
        self.inner.routed(batch, ctx)
    }

    fn stats(&self) -> DispatchStats {
        self.inner.stats()
    }

    fn prefetch_depth(&self) -> usize {
        self.inner.prefetch_depth()
    }

    fn prefetch(&self, predicted: &[(usize, Vec<u32>)]) {
        self.inner.prefetch(predicted)
    }
}

/// The running expert functions of one model, and a dispatcher to them.
pub(super) struct Functions {
    /// The controller's dispatcher, connected as user `controller`.
    pub(super) dispatch: Arc<NatsDispatch>,
    /// Experts per function.
    pub(super) granularity: u32,
    broker: Child,
    _server: EmbeddedServer,
}

impl Functions {
    /// Starts a nats-server and `faasmoe-broker run` for `model` at `granularity` (workers
    /// idle out after 10 min, one instance per function; logs under `log_dir`), waits until
    /// the broker answers, and connects the dispatcher. The functions themselves start cold,
    /// on the first request (the decode section's untimed warm-up step).
    ///
    /// Errors: nats-server or the broker binary is missing or does not come up within 120 s
    /// (the error names `broker.log`).
    pub(super) async fn start(
        model: &Path,
        cfg: &Config,
        granularity: u32,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let model_id = crate::stack::model_id_of(model)?;
        let credentials = InternalCredentials::generate();
        let (server, _monitor_port) = super::deployment::start_server(log_dir, &credentials)?;
        let url = server.url().to_string();
        let mut broker = crate::stack::broker_command(&crate::stack::BrokerLaunch {
            url: &url,
            credentials: &credentials,
            model,
            model_id: &model_id,
            granularity,
            idle_timeout_ms: 600_000,
            max_instances: 1,
            log_dir,
        })?
        .spawn()
        .context("starting faasmoe-broker")?;
        let client = faasmoe_proto::connection::connect(
            &url,
            Some("controller"),
            Some(&credentials.controller),
            "faasmoe-bench-decode",
        )
        .await?;
        let activate = faasmoe_proto::subject::activate(&model_id)?;
        let t0 = Instant::now();
        // Any reply (an empty request is refused) means the broker serves.
        while !faasmoe_proto::connection::answers(
            &client,
            activate.clone(),
            b"{}",
            Duration::from_secs(2),
        )
        .await
        {
            if let Some(status) = broker.try_wait()? {
                anyhow::bail!(
                    "faasmoe-broker exited ({status}) before serving; see {}",
                    log_dir.join("broker.log").display()
                );
            }
            anyhow::ensure!(
                t0.elapsed() < BROKER_START,
                "faasmoe-broker did not answer within {} s; see {}",
                BROKER_START.as_secs(),
                log_dir.join("broker.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let moe: Vec<u32> = cfg.moe_layers().map(|l| l as u32).collect();
        let layout = Layout::new(&moe, cfg.num_experts as u32, granularity);
        // The controller's defaults (`faasmoe controller --help`), but a longer activation
        // timeout for the cold warm-up step.
        let nats = faasmoe_proto::connection::NatsArgs::with_user(
            url.as_str(),
            "controller",
            credentials.controller.as_str(),
        );
        let dispatch = NatsDispatch::connect(
            &nats,
            "faasmoe-bench-decode-dispatch",
            NatsDispatchSettings {
                model_id,
                layout,
                request_timeout: Duration::from_secs(10),
                max_retries: 2,
                activation_timeout: ACTIVATION_TIMEOUT,
                wire_dtype: WireDType::F32,
                controller_id: "faasmoe-bench-decode".into(),
                prefetch_layers: NatsDispatchSettings::DEFAULT_PREFETCH_LAYERS,
                prefetch_max_in_flight: NatsDispatchSettings::DEFAULT_PREFETCH_MAX_IN_FLIGHT,
            },
            cfg.hidden_size,
        )
        .await?;
        Ok(Self {
            dispatch,
            granularity: granularity.clamp(1, cfg.num_experts.max(1) as u32),
            broker,
            _server: server,
        })
    }

    /// Stops the broker (SIGTERM: it stops its workers), then the server.
    pub(super) async fn stop(mut self) {
        crate::stack::terminate(&mut self.broker).await;
    }
}
