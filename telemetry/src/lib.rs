//! Logs and traces of Vesper's binaries (`superpeer`, the `leafpeer` CLI): one call at start-up, one at exit.
//!
//! - **Logs** go to stderr, as text or JSON, filtered by `RUST_LOG` or the binary's default.
//! - **Traces** are exported over OTLP/gRPC when the standard variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, `OTEL_TRACES_EXPORTER` not `none`, `OTEL_SDK_DISABLED` not
//!   `true`. The exporter's other `OTEL_*` variables (headers, timeout, `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`) are read by the OpenTelemetry SDK itself. Without them no OpenTelemetry layer
//!   is installed at all, so tracing costs what it cost before.
//! - Only Vesper's own spans are exported (`vesper_*` crates and the binaries), never those of h2, hyper, tonic
//!   or the exporter, so the exporter cannot trace itself.
//! - Spans leave through the SDK's batch processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048 by
//!   default) that drops when full, exported from its own thread, so a collector that is down or slow never
//!   blocks the code that records spans. The SDK counts what it drops and says so in the log (a warning at the
//!   first drop, the total at shutdown); it offers no way to read the count while it runs.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Who decides whether a trace is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The SDK's default, or what `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` say (a leaf: where a
    /// message's trace starts).
    Environment,
    /// Record only what a caller sampled (a super peer continues the traces leaves start and starts none of its
    /// own), unless `OTEL_TRACES_SAMPLER` says otherwise.
    FollowParent,
}

/// How a binary logs and traces.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of its spans (`OTEL_SERVICE_NAME` wins).
    pub service: &'static str,
    /// Log filter when `RUST_LOG` is not set, in `EnvFilter` syntax.
    pub default_filter: String,
    /// Log lines as JSON objects.
    pub json: bool,
    pub sampling: Sampling,
}

/// Turns span export off and on again (the OpenTelemetry layer's filter).
type Switch = Box<dyn Fn(bool) + Send + Sync>;

/// The installed set-up; [`Telemetry::shutdown`] at exit sends the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    switch: Option<Switch>,
    /// Why traces are not exported even though asked for, to log once the subscriber is up.
    pub export_error: Option<String>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Stops recording spans for export (`false`) or starts again (`true`), for benchmarks that compare both in
    /// one process. Nothing happens when export is not set up.
    pub fn set_exporting(&self, on: bool) {
        if let Some(switch) = &self.switch {
            switch(on);
        }
    }

    /// Flushes and stops the exporter. Blocks while the last batch is sent (the SDK bounds it by its export
    /// timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by default); call it off the async runtime's workers.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("trace export did not shut down cleanly: {error}");
            }
        }
    }
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Whether the environment asks for OTLP trace export.
pub fn export_requested() -> bool {
    let disabled =
        variable("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true"));
    let exporter_none =
        variable("OTEL_TRACES_EXPORTER").is_some_and(|value| value.eq_ignore_ascii_case("none"));
    let endpoint = variable("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    endpoint && !disabled && !exporter_none
}

/// The crates whose spans are exported.
fn exported_targets() -> Targets {
    Targets::new()
        .with_target("vesper_superpeer", Level::INFO)
        .with_target("vesper_leafpeer", Level::INFO)
        .with_target("vesper_proto", Level::INFO)
        .with_target("superpeer", Level::INFO)
        .with_target("leafpeer", Level::INFO)
}

fn provider(options: &Options) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| error.to_string())?;
    let service = variable("OTEL_SERVICE_NAME").unwrap_or_else(|| options.service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource);
    if options.sampling == Sampling::FollowParent && variable("OTEL_TRACES_SAMPLER").is_none() {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
    }
    Ok(builder.build())
}

/// Installs the global subscriber: stderr logs, and OTLP export when the environment asks for it. Call it once,
/// inside the tokio runtime (the exporter's gRPC client is made there).
pub fn init(options: Options) -> Telemetry {
    // The OpenTelemetry crates log through `tracing` too: their warnings (an export failing, spans dropped at a
    // full queue, with the count at shutdown) are shown, their chatter at start-up is not.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn",
            options.default_filter
        ))
    });
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if options.json {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let (provider, export_error) = if export_requested() {
        match provider(&options) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        }
    } else {
        (None, None)
    };
    let (targets, handle) = tracing_subscriber::reload::Layer::new(exported_targets());
    let traces = provider.as_ref().map(|provider| {
        // Each default below costs work on every span, sampled or not: source location and thread name
        // attributes (a string per span), busy/idle timings (two clock reads per poll of an instrumented future),
        // and an OpenTelemetry context attached on every enter. Vesper reads and writes contexts explicitly
        // (`vesper_proto::trace`), so none is needed (docs/BENCHMARKS.md, "Tracing export on vs off").
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(options.service))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(targets)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    let switch: Option<Switch> = provider.is_some().then(|| {
        Box::new(move |on: bool| {
            let _ = handle.modify(|targets| {
                *targets = if on {
                    exported_targets()
                } else {
                    Targets::new()
                }
            });
        }) as Switch
    });
    if let Some(error) = &export_error {
        tracing::warn!(%error, "OTLP trace export was asked for and cannot start; going on without it");
    }
    Telemetry {
        provider,
        switch,
        export_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vesper_crates_are_exported() {
        let targets = exported_targets();
        for ours in ["vesper_superpeer::leaf", "vesper_leafpeer", "leafpeer"] {
            assert!(targets.would_enable(ours, &Level::INFO), "{ours}");
        }
        for theirs in [
            "h2",
            "hyper::proto",
            "tonic::transport",
            "tower",
            "opentelemetry_sdk",
        ] {
            assert!(!targets.would_enable(theirs, &Level::ERROR), "{theirs}");
        }
        assert!(!targets.would_enable("vesper_superpeer", &Level::DEBUG));
    }
}
