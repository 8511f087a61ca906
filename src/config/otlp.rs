//! Tracing export flags (issue #18): where spans go over OTLP, and under what service name.
//! No endpoint, no tracing: nothing is recorded and nothing is exported.

use clap::Args;

use super::{invalid, ConfigError};

/// OTLP/HTTP export of request spans ([`crate::telemetry`]).
#[derive(Args, Debug, Clone, Default)]
pub struct OtlpArgs {
    /// Export request spans over OTLP/HTTP (protobuf) to this collector, e.g.
    /// `http://localhost:4318` (spans go to its `/v1/traces`; a URL already ending in
    /// `/v1/traces` is used as it is). Unset: no tracing at all.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of this process's spans (default: `kvgate-frontend`, `kvgate-worker`
    /// or `kvgate`).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
}

impl OtlpArgs {
    /// The traces URL, when tracing is on. An empty endpoint (an exported but empty env var) is
    /// off, as OpenTelemetry's own SDKs read it.
    pub fn traces_url(&self) -> Result<Option<String>, ConfigError> {
        let Some(e) = self.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let Some(rest) = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://")) else {
            return Err(invalid("--otlp-endpoint", format!("{e:?} is not an http:// or https:// URL")));
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid("--otlp-endpoint", format!("{e:?} names no host")));
        }
        if e.starts_with("https://") {
            return Err(invalid(
                "--otlp-endpoint",
                "https is not supported (no TLS in this build): use a local collector over http",
            ));
        }
        let base = e.trim_end_matches('/');
        Ok(Some(if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.traces_url().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(e: &str) -> Result<Option<String>, ConfigError> {
        OtlpArgs { otlp_endpoint: Some(e.into()), otlp_service_name: None }.traces_url()
    }

    #[test]
    fn the_endpoint_is_a_base_url_unless_it_names_the_traces_path() {
        assert_eq!(url("http://localhost:4318").unwrap().as_deref(), Some("http://localhost:4318/v1/traces"));
        assert_eq!(url("http://c:4318/").unwrap().as_deref(), Some("http://c:4318/v1/traces"));
        assert_eq!(url("http://c:4318/v1/traces").unwrap().as_deref(), Some("http://c:4318/v1/traces"));
        assert_eq!(url("  ").unwrap(), None);
        assert_eq!(OtlpArgs::default().traces_url().unwrap(), None);
        for bad in ["localhost:4318", "grpc://c:4317", "http://", "http:///x", "https://c:4318"] {
            assert!(url(bad).is_err(), "{bad}");
        }
    }
}
