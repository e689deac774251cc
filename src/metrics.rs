//! Prometheus metrics: request counts and latencies by route and status, auth rejections by
//! reason, reloads by result, keys by state. Labels are route labels and fixed words, never a
//! raw path, so their number stays bounded; `key_id` appears only with `per_key_metrics`.
//! The standard `process_*` metrics come from [`process`].

pub mod process;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Shared label text: cloning it per request is a reference-count bump, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelText(pub Arc<str>);

impl fmt::Display for LabelText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestLabels {
    route: LabelText,
    status: u16,
    key_id: Option<LabelText>,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("route", self.route.clone()).encode(encoder.encode_label())?;
        ("status", self.status).encode(encoder.encode_label())?;
        if let Some(key_id) = &self.key_id {
            ("key_id", key_id.clone()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct RouteLabels {
    route: LabelText,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// From 100 µs (an auth rejection) to 30 s (a slow upstream).
const BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// One request as the metrics see it.
pub struct Observation<'a> {
    /// `"-"` when no route matched.
    pub route: &'a LabelText,
    /// The matched route's own handles, when it has them.
    pub handles: Option<&'a RouteMetrics>,
    pub status: u16,
    pub key_id: Option<&'a str>,
    /// The error code keygate answered with, if it answered itself; auth rejections
    /// (`missing_api_key` …, [`AUTH_REJECTIONS`]) are counted by reason.
    pub rejection: Option<&'static str>,
    pub duration: Duration,
    pub upstream_duration: Option<Duration>,
}

/// The error codes that count as `keygate_auth_rejections_total{reason}`.
pub const AUTH_REJECTIONS: [&str; 8] = [
    "missing_api_key",
    "invalid_api_key",
    "revoked_api_key",
    "expired_api_key",
    "ip_not_allowed",
    "insufficient_scope",
    "rate_limited",
    "quota_exceeded",
];

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    upstream_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    rejections: Family<ReasonLabels, Counter>,
    upstream_connections: Family<UpstreamLabels, Gauge>,
    /// Each reason's counter of `rejections`, taken on its first use (so a reason never seen
    /// is not exposed at zero): a flood of rejections hashes no labels.
    rejection_handles: [std::sync::OnceLock<Counter>; AUTH_REJECTIONS.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let upstream_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register("keygate_requests", "Requests answered, by route and status", requests.clone());
        registry.register(
            "keygate_request_duration_seconds",
            "Time from request head to response head, by route",
            request_duration.clone(),
        );
        registry.register(
            "keygate_upstream_duration_seconds",
            "Time the upstream took to send response headers, by route",
            upstream_duration.clone(),
        );
        registry.register(
            "keygate_auth_rejections",
            "Requests refused by authentication or authorization, by reason",
            rejections.clone(),
        );
        let upstream_connections = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "keygate_upstream_connections",
            "Open connections to each upstream host:port",
            upstream_connections.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            rejections,
            upstream_connections,
            rejection_handles: Default::default(),
        }
    }
}

/// One route's metrics, taken from the families once per snapshot, so that recording a request
/// hashes no labels and takes no family lock. The handles share their values with the
/// families' entries, so the exposition sees every count.
#[derive(Debug)]
pub struct RouteMetrics {
    label: LabelText,
    duration: Histogram,
    upstream: Histogram,
    /// The request counter of each status this route has answered so far.
    statuses: std::sync::RwLock<Vec<(u16, Counter)>>,
}

/// Values read at scrape time from the running state.
#[derive(Debug, Default)]
pub struct Current {
    pub reload_successes: u64,
    pub reload_failures: u64,
    pub keys_active: u64,
    pub keys_expired: u64,
    pub keys_revoked: u64,
    /// Failed or timed-out calls to the shared counters store (Redis).
    pub cluster_errors: u64,
}

impl Metrics {
    /// Handles for a route's metrics, for its entry in a snapshot.
    pub fn route(&self, label: &LabelText) -> Arc<RouteMetrics> {
        let labels = RouteLabels { route: label.clone() };
        Arc::new(RouteMetrics {
            label: label.clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
            upstream: self.upstream_duration.get_or_create(&labels).clone(),
            statuses: std::sync::RwLock::default(),
        })
    }

    /// The open-connections gauge of one upstream (`host:port`), shared by every snapshot
    /// that names it.
    pub fn upstream_connections(&self, upstream: &str) -> Gauge {
        self.upstream_connections.get_or_create(&UpstreamLabels { upstream: upstream.to_string() }).clone()
    }

    pub fn observe(&self, o: &Observation<'_>, per_key: bool) {
        if let (Some(handles), false) = (o.handles, per_key) {
            self.observe_on(handles, o);
            return;
        }
        let key_id = if per_key { o.key_id.map(|id| LabelText(Arc::from(id))) } else { None };
        self.requests
            .get_or_create(&RequestLabels { route: o.route.clone(), status: o.status, key_id })
            .inc();
        let route = RouteLabels { route: o.route.clone() };
        self.request_duration.get_or_create(&route).observe(o.duration.as_secs_f64());
        if let Some(upstream) = o.upstream_duration {
            self.upstream_duration.get_or_create(&route).observe(upstream.as_secs_f64());
        }
        self.count_rejection(o.rejection);
    }

    fn observe_on(&self, handles: &RouteMetrics, o: &Observation<'_>) {
        let counted = {
            let statuses = handles.statuses.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            statuses.iter().find(|(status, _)| *status == o.status).map(|(_, counter)| counter.inc())
        };
        if counted.is_none() {
            let labels = RequestLabels { route: handles.label.clone(), status: o.status, key_id: None };
            let counter = self.requests.get_or_create(&labels).clone();
            counter.inc();
            let mut statuses = handles.statuses.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            if !statuses.iter().any(|(status, _)| *status == o.status) {
                statuses.push((o.status, counter));
            }
        }
        handles.duration.observe(o.duration.as_secs_f64());
        if let Some(upstream) = o.upstream_duration {
            handles.upstream.observe(upstream.as_secs_f64());
        }
        self.count_rejection(o.rejection);
    }

    fn count_rejection(&self, code: Option<&'static str>) {
        let Some(code) = code else { return };
        if let Some(i) = AUTH_REJECTIONS.iter().position(|reason| *reason == code) {
            let counter = self.rejection_handles[i].get_or_init(|| {
                self.rejections.get_or_create(&ReasonLabels { reason: AUTH_REJECTIONS[i] }).clone()
            });
            counter.inc();
        }
    }

    /// The exposition (OpenMetrics text, which Prometheus reads), with `current` values.
    pub fn render(&self, current: &Current) -> Result<String, fmt::Error> {
        let mut dynamic = Registry::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        reloads.get_or_create(&ResultLabels { result: "success" }).inc_by(current.reload_successes);
        reloads.get_or_create(&ResultLabels { result: "failure" }).inc_by(current.reload_failures);
        dynamic.register("keygate_config_reloads", "Reload attempts, by result", reloads);
        let keys = Family::<StateLabels, Gauge>::default();
        for (state, n) in [
            ("active", current.keys_active),
            ("expired", current.keys_expired),
            ("revoked", current.keys_revoked),
        ] {
            keys.get_or_create(&StateLabels { state }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        dynamic.register("keygate_keys", "Keys in the running key table, by state", keys);
        process::Sample::read().register(&mut dynamic);
        let cluster_errors = Counter::<u64>::default();
        cluster_errors.inc_by(current.cluster_errors);
        dynamic.register(
            "keygate_cluster_errors",
            "Redis calls of the [cluster] counters that failed or were slower than timeout",
            cluster_errors,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)?;
        prometheus_client::encoding::text::encode_registry(&mut out, &dynamic)?;
        prometheus_client::encoding::text::encode_eof(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let metrics = Metrics::default();
        let route = LabelText(Arc::from("/api/"));
        let observe = |status, key_id, rejection| {
            metrics.observe(
                &Observation {
                    route: &route,
                    handles: None,
                    status,
                    key_id,
                    rejection,
                    duration: Duration::from_micros(300),
                    upstream_duration: None,
                },
                true,
            )
        };
        observe(200, Some("k1"), None);
        observe(401, None, Some("missing_api_key"));
        let current = Current {
            reload_successes: 2,
            reload_failures: 1,
            keys_active: 5,
            keys_expired: 0,
            keys_revoked: 1,
            cluster_errors: 0,
        };
        let text = metrics.render(&current).unwrap();
        for want in [
            "keygate_requests_total{route=\"/api/\",status=\"200\",key_id=\"k1\"} 1",
            "keygate_requests_total{route=\"/api/\",status=\"401\"} 1",
            "keygate_auth_rejections_total{reason=\"missing_api_key\"} 1",
            "keygate_request_duration_seconds_bucket{le=\"0.0005\",route=\"/api/\"} 2",
            "keygate_config_reloads_total{result=\"failure\"} 1",
            "keygate_keys{state=\"revoked\"} 1",
            #[cfg(target_os = "linux")]
            "# TYPE process_cpu_seconds counter",
            #[cfg(target_os = "linux")]
            "# TYPE process_resident_memory_bytes gauge",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn route_handles_count_into_the_same_series() {
        let metrics = Metrics::default();
        let route = LabelText(Arc::from("/api/"));
        let handles = metrics.route(&route);
        let observe = |handles: Option<&RouteMetrics>, status: u16, upstream_ms: Option<u64>| {
            let observation = Observation {
                route: &route,
                handles,
                status,
                key_id: None,
                rejection: (status == 401).then_some("missing_api_key"),
                duration: Duration::from_micros(300),
                upstream_duration: upstream_ms.map(Duration::from_millis),
            };
            metrics.observe(&observation, false);
        };
        observe(Some(&handles), 200, Some(2));
        observe(Some(&handles), 200, Some(2));
        observe(None, 200, None);
        observe(Some(&handles), 401, None);
        // A second snapshot's handles for the same route share the series.
        observe(Some(&metrics.route(&route)), 200, None);
        let current = Current::default();
        let text = metrics.render(&current).unwrap();
        for want in [
            "keygate_requests_total{route=\"/api/\",status=\"200\"} 4",
            "keygate_requests_total{route=\"/api/\",status=\"401\"} 1",
            "keygate_auth_rejections_total{reason=\"missing_api_key\"} 1",
            "keygate_request_duration_seconds_count{route=\"/api/\"} 5",
            "keygate_upstream_duration_seconds_count{route=\"/api/\"} 2",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
