//! Logging the NATS connection's outages (async-nats event callback): a warning when the
//! connection is lost, and when it is back, how long it was down.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Event;
use tracing::{info, warn};

/// Tracks one connection's outages; clones share the state. Install it with
/// [`OutageLog::options`] before connecting.
#[derive(Debug, Clone, Default)]
pub struct OutageLog {
    down_since: Arc<Mutex<Option<Instant>>>,
}

impl OutageLog {
    /// A log with no outage yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `options` with an event callback that reports to this log.
    pub fn options(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        let log = self.clone();
        options.event_callback(move |event| {
            let log = log.clone();
            async move { log.record(event) }
        })
    }

    /// How long the connection has been down, `None` while it is up.
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    /// Records and logs one connection event.
    pub fn record(&self, event: Event) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Disconnected => {
                if down.is_none() {
                    *down = Some(Instant::now());
                }
                warn!("NATS connection lost; reconnecting");
            }
            Event::Connected => match down.take() {
                Some(since) => info!(
                    outage_ms = since.elapsed().as_secs_f64() * 1e3,
                    "NATS connection back after {:?}",
                    since.elapsed()
                ),
                None => info!("NATS connected"),
            },
            Event::SlowConsumer(sid) => warn!(sid, "NATS slow consumer: messages dropped"),
            Event::LameDuckMode => warn!("NATS server in lame duck mode"),
            Event::ServerError(e) => warn!(error = %e, "NATS server error"),
            Event::ClientError(e) => warn!(error = %e, "NATS client error"),
            Event::Draining | Event::Closed => info!(%event, "NATS connection"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_lasts_from_the_first_disconnect_to_the_reconnect() {
        let log = OutageLog::new();
        assert_eq!(log.down_for(), None);
        log.record(Event::Disconnected);
        let first = log.down_for().expect("down");
        log.record(Event::Disconnected); // a failed reconnect attempt does not restart it
        assert!(log.down_for().expect("still down") >= first);
        log.record(Event::Connected);
        assert_eq!(log.down_for(), None);
    }
}
