//! W3C trace context carried in messages.
//!
//! A message rides long-lived streams and batches (the leaf's session, `Cluster.DeliverStream`, the mailbox), so
//! per-call gRPC metadata would make one trace per stream. Each message carries its own context instead, in
//! `traceparent` / `tracestate` fields (`Message`, `SendMessageRequest`), written and read with the
//! OpenTelemetry W3C propagator. Both fields stay empty when the sender traces nothing, so an untraced message
//! costs nothing on the wire; a traced one 55 bytes or so.
//!
//! Unary calls (record writes) carry the same two values as gRPC metadata instead ([`inject_metadata`],
//! [`adopt_metadata`]): a unary call is one operation, so per-call metadata is per-operation context.
//!
//! The span a context is taken from or given to is a `tracing` span; with no OpenTelemetry layer installed its
//! context is empty, nothing is written, and setting a parent does nothing.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Longest `traceparent` accepted (the W3C format is 55 characters for version 00).
pub const MAX_TRACEPARENT_LEN: usize = 64;
/// Longest `tracestate` accepted (W3C: at most 32 members; vendors keep it far shorter).
pub const MAX_TRACESTATE_LEN: usize = 512;

struct Fields<'a> {
    traceparent: &'a mut String,
    tracestate: &'a mut String,
}

impl Injector for Fields<'_> {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => *self.traceparent = value,
            "tracestate" => *self.tracestate = value,
            _ => {}
        }
    }
}

struct Read<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" if !self.traceparent.is_empty() => Some(self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Writes the context of `span` into the two fields; clears them when the span is not traced or not sampled.
/// An unsampled message thus carries nothing, and no hop after it spends anything on it: the hops create their
/// spans only for a message with a context (its sender sampled it).
pub fn write(span: &tracing::Span, traceparent: &mut String, tracestate: &mut String) {
    traceparent.clear();
    tracestate.clear();
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return;
    }
    TraceContextPropagator::new().inject_context(
        &context,
        &mut Fields {
            traceparent,
            tracestate,
        },
    );
}

/// The context in the two fields; None when they are empty, too long or malformed.
fn extract(traceparent: &str, tracestate: &str) -> Option<opentelemetry::Context> {
    if traceparent.is_empty()
        || traceparent.len() > MAX_TRACEPARENT_LEN
        || tracestate.len() > MAX_TRACESTATE_LEN
    {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&Read {
        traceparent,
        tracestate,
    });
    context.span().span_context().is_valid().then_some(context)
}

/// Makes the context in the two fields the parent of `span`, which must not have been entered yet. Fields that
/// are empty, too long or malformed leave `span` a root (sampled or not by the receiver's own rule).
pub fn adopt(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if let Some(parent) = extract(traceparent, tracestate) {
        let _ = span.set_parent(parent);
    }
}

/// Writes the context of `span` into a request's metadata when it is sampled (nothing otherwise).
pub fn inject_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let (mut traceparent, mut tracestate) = (String::new(), String::new());
    write(span, &mut traceparent, &mut tracestate);
    if traceparent.is_empty() {
        return;
    }
    if let Ok(value) = traceparent.parse() {
        metadata.insert("traceparent", value);
    }
    if !tracestate.is_empty() {
        if let Ok(value) = tracestate.parse() {
            metadata.insert("tracestate", value);
        }
    }
}

/// The `traceparent` and `tracestate` of a request's metadata, if it has a `traceparent` (empty state when it
/// has none or it is not text).
pub fn metadata_fields(metadata: &tonic::metadata::MetadataMap) -> Option<(&str, &str)> {
    let traceparent = metadata.get("traceparent")?.to_str().ok()?;
    let tracestate = metadata
        .get("tracestate")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    Some((traceparent, tracestate))
}

/// Adds a link from `span` to the context in the two fields (a batch span links to each message it carries).
/// Fields that are empty, too long or malformed add nothing.
pub fn link(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if let Some(context) = extract(traceparent, tracestate) {
        span.add_link(context.span().span_context().clone());
    }
}

/// One hop: `span` (not entered yet) continues the context in the two fields, which then carry `span`'s own
/// context to the next hop. Untraced fields stay empty.
pub fn hop(span: &tracing::Span, traceparent: &mut String, tracestate: &mut String) {
    adopt(span, traceparent, tracestate);
    write(span, traceparent, tracestate);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untraced_span_writes_nothing() {
        let (mut parent, mut state) = ("stale".to_string(), "stale".to_string());
        write(&tracing::info_span!("untraced"), &mut parent, &mut state);
        assert_eq!((parent.as_str(), state.as_str()), ("", ""));
    }

    #[test]
    fn bad_fields_are_ignored() {
        let span = tracing::info_span!("receiver");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-0000000000000000-01",
            &"0".repeat(100),
        ] {
            adopt(&span, bad, "");
        }
        adopt(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
            &"x".repeat(600),
        );
    }
}
