//! W3C trace context (<https://www.w3.org/TR/trace-context/>) carried in NATS message
//! headers, without depending on OpenTelemetry: services pass the `traceparent` string on
//! and their tracing layer turns it into spans.

use async_nats::HeaderMap;

/// Header carrying `00-<trace id>-<parent span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying vendor-specific trace state (passed through untouched).
pub const TRACESTATE: &str = "tracestate";

/// Sets the `traceparent` header if `traceparent` is valid ([`parse_traceparent`]);
/// returns whether it was set (an invalid value is dropped rather than propagated).
pub fn inject(headers: &mut HeaderMap, traceparent: &str) -> bool {
    let valid = parse_traceparent(traceparent).is_some();
    if valid {
        headers.insert(TRACEPARENT, traceparent);
    }
    valid
}

/// The `traceparent` header of a message, if present and valid.
pub fn extract(headers: Option<&HeaderMap>) -> Option<String> {
    let value = headers?.get(TRACEPARENT)?.as_str();
    parse_traceparent(value).map(|_| value.to_string())
}

/// Builds a version-00 `traceparent` from a trace id, a span id and the sampled flag.
pub fn format_traceparent(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "00-{}-{}-{:02x}",
        hex(&trace_id),
        hex(&span_id),
        sampled as u8
    )
}

/// Parses `00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>` into
/// `(trace_id_hex, span_id_hex, flags)`; all-zero ids are invalid, as the spec says.
pub fn parse_traceparent(s: &str) -> Option<(String, String, u8)> {
    let is_hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = s.split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    if *version != "00" || !is_hex(trace, 32) || !is_hex(span, 16) || !is_hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((
        trace.to_string(),
        span.to_string(),
        u8::from_str_radix(flags, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_through_headers() {
        let mut h = HeaderMap::new();
        assert!(inject(&mut h, TP));
        assert_eq!(extract(Some(&h)).as_deref(), Some(TP));
        assert_eq!(extract(None), None);
        assert_eq!(extract(Some(&HeaderMap::new())), None);
        assert!(!inject(&mut HeaderMap::new(), "garbage"));
    }

    #[test]
    fn parse_validates_the_format() {
        assert_eq!(
            parse_traceparent(TP),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into(),
                1
            ))
        );
        let tp = format_traceparent([0xab; 16], [1; 8], true);
        assert_eq!(parse_traceparent(&tp).map(|p| p.2), Some(1));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }
}
