//! One instance's life as the broker sees it: spawned, waited on until ready (its `READY`
//! line or `subscribed` event), owned until it exits (signals forwarded, exit status
//! recorded), with the lifecycle events each step publishes.

use super::*;

impl Inner {
    /// Spawns one instance, waits until it is ready, exits or times out.
    pub(super) async fn start_instance(self: Arc<Self>, spec: FunctionSpec) -> ActivateResult {
        let result = self.clone().start_instance_inner(&spec).await;
        self.state.lock().unwrap().pending.remove(&spec.id);
        self.changed();
        result
    }

    pub(super) async fn start_instance_inner(
        self: Arc<Self>,
        spec: &FunctionSpec,
    ) -> ActivateResult {
        let instance_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let spawned_at = Instant::now();
        let mut info = InstanceInfo {
            function_id: spec.id.clone(),
            instance_id: instance_id.clone(),
            pid: None,
            state: InstanceState::Starting,
            started_unix_ms: unix_ms(),
            cold_start_ms: None,
            exit: None,
        };
        let mut instance: Box<dyn Instance> = match self.backend.spawn(spec, &instance_id) {
            Ok(i) => i,
            Err(e) => {
                warn!(function_id = %spec.id, error = %e, "spawn failed");
                self.publish(self.event(EventKind::SpawnFailed, &info))
                    .await;
                return unavailable(format!("function `{}`: spawn failed: {e}", spec.id));
            }
        };
        info.pid = instance.pid();
        let ready_signal = instance.take_ready_signal();
        let (state_tx, mut state_rx) = watch::channel(InstanceState::Starting);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        {
            let mut st = self.state.lock().unwrap();
            st.live.insert(
                instance_id.clone(),
                Live {
                    info: info.clone(),
                    spawned_at,
                    state_tx,
                    control: control_tx.clone(),
                    service_id: None,
                },
            );
            let alive = st.alive(&spec.id);
            let peak = st.peak_alive.entry(spec.id.clone()).or_default();
            *peak = (*peak).max(alive);
        }
        self.changed();
        self.spawns.fetch_add(1, Ordering::SeqCst);
        info!(function_id = %spec.id, %instance_id, pid = ?info.pid, "instance started");
        self.publish(self.event(EventKind::Started, &info)).await;
        tokio::spawn(
            self.clone()
                .own_instance(instance_id.clone(), instance, control_rx),
        );
        if let Some(sig) = ready_signal {
            let me = self.clone();
            let id = instance_id.clone();
            tokio::spawn(async move {
                if sig.await.is_ok() {
                    me.mark_ready(&id);
                }
            });
        }
        let waited = tokio::time::timeout(
            self.cfg.ready_timeout,
            state_rx.wait_for(|s| *s != InstanceState::Starting),
        )
        .await;
        let outcome = match waited {
            Ok(Ok(s)) => *s,
            Ok(Err(_)) => InstanceState::Exited, // sender dropped: record removed
            Err(_) => {
                warn!(function_id = %spec.id, %instance_id, timeout = ?self.cfg.ready_timeout, "not ready in time: killing");
                let _ = control_tx.send(Control::Kill);
                return unavailable(format!(
                    "function `{}`: instance {instance_id} not ready within {:?}",
                    spec.id, self.cfg.ready_timeout
                ));
            }
        };
        match outcome {
            InstanceState::Ready | InstanceState::Draining => {
                let cold = self
                    .state
                    .lock()
                    .unwrap()
                    .live
                    .get(&instance_id)
                    .and_then(|l| l.info.cold_start_ms);
                ActivateResult::Ok {
                    instance_id,
                    cold_start_ms: cold.unwrap_or_else(|| spawned_at.elapsed().as_secs_f64() * 1e3),
                    already_running: false,
                }
            }
            _ => {
                let exit = self
                    .state
                    .lock()
                    .unwrap()
                    .exited
                    .iter()
                    .rev()
                    .find(|i| i.instance_id == instance_id)
                    .and_then(|i| i.exit);
                unavailable(format!(
                    "function `{}`: instance {instance_id} exited before it was ready ({exit:?})",
                    spec.id
                ))
            }
        }
    }

    /// Owns one instance until it exits; records the exit and publishes the event.
    pub(super) async fn own_instance(
        self: Arc<Self>,
        instance_id: String,
        mut instance: Box<dyn Instance>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let exit = loop {
            let signal = tokio::select! {
                r = instance.wait() => break r,
                c = control.recv() => c,
            };
            let r = match signal {
                Some(Control::Terminate) => instance.terminate(),
                Some(Control::Kill) => instance.kill(),
                None => break instance.wait().await,
            };
            if let Err(e) = r {
                warn!(%instance_id, error = %e, "signalling instance failed");
            }
        };
        let exit = match exit {
            Ok(e) => e,
            Err(e) => {
                warn!(%instance_id, error = %e, "waiting for instance failed");
                InstanceExit {
                    code: None,
                    signal: None,
                }
            }
        };
        // The event is queued while the instance still counts as alive, before the state
        // changes: an activation that starts the function again (its `started`) can only
        // come after this `stopped` on the subject.
        let known = {
            let st = self.state.lock().unwrap();
            st.live
                .get(&instance_id)
                .map(|l| (l.info.clone(), l.info.state))
        };
        if let Some((info, was)) = &known {
            info!(function_id = %info.function_id, %instance_id, ?exit, "instance exited");
            let kind = if *was == InstanceState::Starting {
                EventKind::SpawnFailed
            } else {
                EventKind::Stopped
            };
            let mut ev = self.event(kind, info);
            ev.exit_status = exit.code;
            // Bounded: a connection whose send queue is full must not hold up the state
            // change. The event is not lost then, only late (its task goes on).
            let me = self.clone();
            let queued = tokio::spawn(async move { me.publish(ev).await });
            if tokio::time::timeout(EVENT_QUEUE_TIMEOUT, queued)
                .await
                .is_err()
            {
                warn!(%instance_id, "the exit event could not be queued in time (connection down?); it follows late");
            }
        }
        {
            let mut st = self.state.lock().unwrap();
            if let Some(l) = st.live.remove(&instance_id) {
                let mut info = l.info;
                info.state = InstanceState::Exited;
                info.exit = Some(exit);
                st.exited.push_back(info);
                while st.exited.len() > EXITED_HISTORY {
                    st.exited.pop_front();
                }
                let _ = l.state_tx.send(InstanceState::Exited);
            }
        }
        self.changed();
    }

    pub(super) fn mark_ready(self: &Arc<Self>, instance_id: &str) {
        let ev = {
            let mut st = self.state.lock().unwrap();
            let Some(l) = st.live.get_mut(instance_id) else {
                return;
            };
            if l.info.state != InstanceState::Starting {
                return;
            }
            let cold = l.spawned_at.elapsed().as_secs_f64() * 1e3;
            l.info.state = InstanceState::Ready;
            l.info.cold_start_ms = Some(cold);
            let _ = l.state_tx.send(InstanceState::Ready);
            let mut ev = self.event(EventKind::Ready, &l.info);
            ev.cold_start_ms = Some(cold);
            ev
        };
        self.changed();
        if let Some(ms) = ev.cold_start_ms {
            metrics::histogram!(faasmoe_telemetry::metrics::COLD_START_SECONDS).record(ms / 1e3);
        }
        info!(function_id = %ev.function_id, %instance_id, cold_start_ms = ev.cold_start_ms, "instance ready");
        let me = self.clone();
        tokio::spawn(async move { me.publish(ev).await });
    }

    /// The instance said it has unsubscribed (its `draining` event): no longer ready.
    pub(super) fn mark_draining(&self, instance_id: &str) {
        {
            let mut st = self.state.lock().unwrap();
            let Some(l) = st.live.get_mut(instance_id) else {
                return;
            };
            if l.info.state != InstanceState::Ready {
                return;
            }
            l.info.state = InstanceState::Draining;
            let _ = l.state_tx.send(InstanceState::Draining);
        }
        self.changed();
    }
}
