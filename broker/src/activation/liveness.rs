//! Whether an instance is connected, asked of the instance itself: its NATS micro service
//! answers `$SRV.PING` (direct, or the broadcast that discovers its service id) from its own
//! task, independent of its batching loop; and the broker's own connection outages, logged.

use super::*;

/// What the broadcast ping found out about one instance.
pub(super) enum Discovery {
    /// It answered (its service id is now in its record).
    Found,
    /// The server answered *no responders*: no worker at all is connected.
    NoWorkers,
    /// Others may have answered, it did not within the window (frozen, overloaded, or not
    /// connected).
    NotFound,
}

/// Logs the broker's NATS outages with their duration, until the activator is dropped.
/// (async-nats reconnects on its own and resubscribes; activations asked during an outage
/// reach the broker once both ends are back.)
pub(super) async fn watch_connection(inner: std::sync::Weak<Inner>) {
    let mut down_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(CONNECTION_POLL).await;
        let Some(me) = inner.upgrade() else { return };
        let connected = me.client.connection_state() == async_nats::connection::State::Connected;
        drop(me);
        match (connected, down_since) {
            (false, None) => {
                warn!("NATS connection lost; reconnecting");
                down_since = Some(Instant::now());
            }
            (true, Some(t)) => {
                info!(
                    outage_ms = t.elapsed().as_secs_f64() * 1e3,
                    "NATS connection restored"
                );
                down_since = None;
            }
            _ => {}
        }
    }
}

impl Inner {
    /// Whether instance `instance_id` is connected: its micro service answers a ping (see
    /// [`ActivationConfig::probe_timeout`]). Only *no responders* counts as not connected;
    /// silence (a frozen or overloaded instance) trusts the records.
    pub(super) async fn connected(&self, instance_id: &str) -> bool {
        let Some(timeout) = self.cfg.probe_timeout else {
            return true;
        };
        let known = self
            .state
            .lock()
            .unwrap()
            .live
            .get(instance_id)
            .and_then(|l| l.service_id.clone());
        let service_id = match known {
            Some(id) => id,
            // Its answer to the broadcast is the ping.
            None => {
                return match self.discover(instance_id, timeout).await {
                    Discovery::Found => true,
                    Discovery::NoWorkers => false,
                    Discovery::NotFound => {
                        debug!(%instance_id, ?timeout, "no pong from the instance; trusting its records");
                        true
                    }
                }
            }
        };
        let subject = format!("$SRV.PING.{WORKER_SERVICE}.{service_id}");
        match tokio::time::timeout(timeout, self.client.request(subject, bytes::Bytes::new())).await
        {
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => false,
            // A pong, or silence (a loaded machine): connected.
            _ => true,
        }
    }

    /// Broadcasts `$SRV.PING.faasmoe-expert` and records the service id of every instance
    /// of this broker's model that answers, until `want` answers or `window` has passed.
    pub(super) async fn discover(&self, want: &str, window: Duration) -> Discovery {
        let inbox = self.client.new_inbox();
        let mut sub = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot subscribe for pong replies");
                return Discovery::NotFound;
            }
        };
        if let Err(e) = self
            .client
            .publish_with_reply(
                format!("$SRV.PING.{WORKER_SERVICE}"),
                inbox,
                bytes::Bytes::new(),
            )
            .await
        {
            warn!(error = %e, "cannot ping the workers");
            return Discovery::NotFound;
        }
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Discovery::NoWorkers;
            }
            let Ok(pong) =
                serde_json::from_slice::<async_nats::service::PingResponse>(&msg.payload)
            else {
                continue;
            };
            if pong.metadata.get("model") != Some(&self.cfg.model_id) {
                continue;
            }
            let Some(instance) = pong.metadata.get("instance_id") else {
                continue;
            };
            if let Some(l) = self.state.lock().unwrap().live.get_mut(instance) {
                l.service_id = Some(pong.id.clone());
            }
            if instance == want {
                return Discovery::Found;
            }
        }
        Discovery::NotFound
    }
}
