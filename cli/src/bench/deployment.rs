//! A running deployment of one mode (nats-server, broker, controllers or baseline servers)
//! and the counters read from it: nats-server `/varz`, the controllers' `controller_stats`.

use super::*;

/// A running deployment of one mode.
pub(super) struct Deployment {
    pub(super) server: EmbeddedServer,
    /// This deployment's internal passwords (generated per deployment).
    pub(super) credentials: InternalCredentials,
    /// One connection per tenant, with the tenant's own credentials (created at start).
    pub(super) tenant_clients: BTreeMap<String, async_nats::Client>,
    pub(super) monitor_port: u16,
    pub(super) broker: Option<Child>,
    pub(super) serving: Vec<Child>,
    pub(super) model_id: String,
}

pub(super) fn start_server(
    log_dir: &Path,
    credentials: &InternalCredentials,
) -> anyhow::Result<(EmbeddedServer, u16)> {
    // Two free ports, distinct; a port taken between the probe and the server's bind is retried.
    let mut last = None;
    for _ in 0..4 {
        let monitor_port = faasmoe_broker::server::free_port()?;
        let mut port = faasmoe_broker::server::free_port()?;
        while port == monitor_port {
            port = faasmoe_broker::server::free_port()?;
        }
        let _ = std::fs::remove_dir_all(log_dir.join("nats-runtime"));
        let opts = ServerOptions {
            internal_credentials: Some(credentials.clone()),
            config: faasmoe_broker::server::default_config(),
            runtime_dir: Some(log_dir.join("nats-runtime")),
            port: Some(port),
            monitor_port: Some(monitor_port),
            log_file: Some(log_dir.join("nats-server.log")),
            ..Default::default()
        };
        std::fs::create_dir_all(log_dir)?;
        match EmbeddedServer::start(opts) {
            Ok(server) => return Ok((server, monitor_port)),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::Error::from(last.expect("tried"))
        .context("starting nats-server (run scripts/install-nats-server?)"))
}

/// Creates `tenants` (default quotas) on `server` and connects as each; also returns the
/// admin connection (the broker's user) that created them.
pub(super) async fn tenant_clients(
    server: &EmbeddedServer,
    credentials: &InternalCredentials,
    tenants: &[String],
) -> anyhow::Result<(async_nats::Client, BTreeMap<String, async_nats::Client>)> {
    let url = server.url();
    let admin_client = faasmoe_proto::connection::connect(
        url,
        Some("broker"),
        Some(&credentials.broker),
        "faasmoe-bench-admin",
    )
    .await?;
    let admin =
        server.tenant_admin(faasmoe_broker::TenantStore::open_default(admin_client.clone()).await?);
    let mut clients = BTreeMap::new();
    for t in tenants {
        let creds = admin.create(t, faasmoe_broker::Quota::default()).await?;
        clients.insert(
            t.clone(),
            faasmoe_proto::connection::connect(
                url,
                Some(&creds.user),
                Some(&creds.password),
                &format!("faasmoe-bench-{t}"),
            )
            .await?,
        );
    }
    Ok((admin_client, clients))
}

impl Deployment {
    pub(super) async fn start(
        spec: &Spec,
        tenants: &[String],
        model: &Path,
        a: &BenchArgs,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let model_id = model_id_of(model)?;
        let credentials = InternalCredentials::generate();
        let (server, monitor_port) = start_server(log_dir, &credentials)?;
        let url = server.url().to_string();
        // The load comes from the tenants themselves, each on its own credentials (the
        // controllers run without quotas).
        let (_, tenant_clients) = tenant_clients(&server, &credentials, tenants).await?;
        let me = std::env::current_exe()?;
        let mut serving = Vec::new();
        let mut broker = None;
        let controller = |extra: Vec<String>, name: &str| -> anyhow::Result<Child> {
            Command::new(&me)
                .args([
                    "controller",
                    "--no-quota",
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "controller",
                ])
                .env("NATS_PASSWORD", &credentials.controller)
                .arg("--model-dir")
                .arg(model)
                .args(["--model-id", &model_id])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log_file(log_dir, name)?)
                .kill_on_drop(true)
                .spawn()
                .context("starting a controller")
        };
        let baseline = |ts: &[String], name: &str| -> anyhow::Result<Child> {
            Command::new(&me)
                .args([
                    "serve-baseline",
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "controller",
                ])
                .env("NATS_PASSWORD", &credentials.controller)
                .arg("--model")
                .arg(model)
                .arg("--tenants")
                .arg(ts.join(","))
                .stdout(Stdio::null())
                .stderr(log_file(log_dir, name)?)
                .kill_on_drop(true)
                .spawn()
                .context("starting serve-baseline")
        };
        let g = spec.granularity.unwrap_or(1);
        if spec.mode.uses_functions() {
            broker = Some(
                crate::stack::broker_command(&crate::stack::BrokerLaunch {
                    url: &url,
                    credentials: &credentials,
                    model,
                    model_id: &model_id,
                    granularity: g,
                    idle_timeout_ms: a.idle_timeout_ms,
                    max_instances: a.max_instances,
                    log_dir,
                })?
                .spawn()
                .context("starting faasmoe-broker")?,
            );
        }
        match spec.mode {
            Mode::Baseline => {
                for t in tenants {
                    serving.push(baseline(
                        std::slice::from_ref(t),
                        &format!("baseline-{t}.log"),
                    )?);
                }
            }
            Mode::SharedBaseline => serving.push(baseline(tenants, "baseline-shared.log")?),
            // The controllers take the granularity from the broker's deployment record.
            Mode::FaasmoeShared => serving.push(controller(Vec::new(), "controller.log")?),
            Mode::FaasmoePrivate => {
                for t in tenants {
                    serving.push(controller(
                        vec!["--tenants".into(), t.clone()],
                        &format!("controller-{t}.log"),
                    )?);
                }
            }
            Mode::LocalSplit => serving.push(controller(
                vec!["--local-experts".into()],
                "controller.log",
            )?),
            Mode::LocalBaseline => {
                for t in tenants {
                    serving.push(controller(
                        vec!["--local-experts".into(), "--tenants".into(), t.clone()],
                        &format!("controller-{t}.log"),
                    )?);
                }
            }
        }
        let d = Self {
            server,
            credentials,
            tenant_clients,
            monitor_port,
            broker,
            serving,
            model_id,
        };
        d.wait_ready(tenants, Duration::from_secs(900)).await?;
        Ok(d)
    }

    /// The operator's connection (user `broker`): events and the controllers' stats.
    pub(super) async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        Ok(faasmoe_proto::connection::connect(
            self.server.url(),
            Some("broker"),
            Some(&self.credentials.broker),
            "faasmoe-bench",
        )
        .await?)
    }

    pub(super) async fn wait_ready(
        &self,
        tenants: &[String],
        limit: Duration,
    ) -> anyhow::Result<()> {
        use faasmoe_proto::connection::answers;
        // The broker's activation subject may be requested by controllers only.
        let client = faasmoe_proto::connection::connect(
            self.server.url(),
            Some("controller"),
            Some(&self.credentials.controller),
            "faasmoe-bench-probe",
        )
        .await?;
        let t0 = Instant::now();
        let mut pending: Vec<String> = tenants.to_vec();
        let mut broker_up = self.broker.is_none();
        let act = faasmoe_proto::subject::activate(&self.model_id)?;
        while t0.elapsed() < limit {
            let mut still = Vec::new();
            for t in pending {
                // An empty body is a bad request: any reply means the tenant is served.
                let subject = faasmoe_proto::subject::generate(&t)?;
                if !answers(
                    &self.tenant_clients[&t],
                    subject,
                    b"",
                    Duration::from_secs(2),
                )
                .await
                {
                    still.push(t);
                }
            }
            pending = still;
            if !broker_up {
                broker_up = answers(&client, act.clone(), b"{}", Duration::from_secs(2)).await;
            }
            if pending.is_empty() && broker_up {
                return Ok(());
            }
            for c in &self.serving {
                if c.id().is_none() {
                    bail!("a serving process exited during startup; see its log");
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!("the deployment did not come up within {limit:?} (not served: {pending:?}, broker ready: {broker_up})")
    }

    pub(super) fn sampler(&self) -> Sampler {
        let mut fixed = vec![("nats", self.server.pid() as i32)];
        if let Some(b) = &self.broker {
            fixed.push(("broker", b.id().unwrap_or(0) as i32));
        }
        for c in &self.serving {
            fixed.push(("serving", c.id().unwrap_or(0) as i32));
        }
        Sampler {
            start: Instant::now(),
            fixed,
            worker_parent: self.broker.as_ref().and_then(|b| b.id()).map(|p| p as i32),
            last: None,
            samples: vec![],
        }
    }

    pub(super) async fn stop(mut self) {
        let mut all: Vec<&mut Child> = self.serving.iter_mut().collect();
        if let Some(b) = self.broker.as_mut() {
            all.push(b);
        }
        for child in all {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.server.stop();
    }
}

/// nats-server's /varz counters.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Varz {
    pub(super) in_msgs: u64,
    pub(super) out_msgs: u64,
    pub(super) in_bytes: u64,
    pub(super) out_bytes: u64,
}

impl Varz {
    /// The counts from `before` to `self` (zero where a counter went back, e.g. after a
    /// server restart).
    pub(super) fn since(&self, before: &Varz) -> Varz {
        Varz {
            in_msgs: self.in_msgs.saturating_sub(before.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(before.out_msgs),
            in_bytes: self.in_bytes.saturating_sub(before.in_bytes),
            out_bytes: self.out_bytes.saturating_sub(before.out_bytes),
        }
    }
}

pub(super) async fn varz(port: u16) -> anyhow::Result<Varz> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    let v: serde_json::Value = serde_json::from_str(body)?;
    let g = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Varz {
        in_msgs: g("in_msgs"),
        out_msgs: g("out_msgs"),
        in_bytes: g("in_bytes"),
        out_bytes: g("out_bytes"),
    })
}

/// Dispatch counters summed over the controllers (scatter-gather on
/// `faasmoe.v1.admin.controller_stats`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Dispatch {
    pub(super) controllers: usize,
    pub(super) invocations: u64,
    pub(super) bytes: u64,
    pub(super) activations: u64,
}

pub(super) async fn dispatch_stats(
    client: &async_nats::Client,
    expected: usize,
) -> anyhow::Result<Dispatch> {
    let mut d = Dispatch::default();
    if expected == 0 {
        return Ok(d);
    }
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            faasmoe_proto::subject::admin("controller_stats")?,
            inbox,
            "".into(),
        )
        .await?;
    client.flush().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while d.controllers < expected {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await else {
            break;
        };
        let s = faasmoe_proto::stats::ControllerStats::decode(&m.payload)
            .context("a controller's controller_stats")?
            .dispatch;
        d.controllers += 1;
        d.invocations += s.invocations;
        d.bytes += s.bytes_sent + s.bytes_received;
        d.activations += s.activations;
    }
    Ok(d)
}
