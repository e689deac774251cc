//! The compiled route table: which upstream, and which scopes, a (host, path) maps to.

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method};

/// Where a route forwards to, parsed once at load.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to the forwarded path; empty or starting with '/', never ending with '/'.
    pub base_path: String,
    /// The `Host` sent upstream unless the route preserves the client's.
    pub host_header: HeaderValue,
    /// How requests travel there, and the connections that carry them.
    pub transport: crate::proxy::transport::Transport,
}

/// Which scope a method needs on a route: any one of the listed scopes suffices.
#[derive(Debug, Clone, Default)]
pub struct ScopeRule {
    pub by_method: Vec<(Method, Box<[Box<str>]>)>,
    /// The `"*"` entry: every method not listed.
    pub other: Option<Box<[Box<str>]>>,
}

impl ScopeRule {
    /// The scopes that admit `method`; `None` means no key may use this method here, since a
    /// scopes table that does not mention a method (and has no `"*"`) must fail closed.
    pub fn required(&self, method: &Method) -> Option<&[Box<str>]> {
        self.by_method
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, scopes)| &**scopes)
            .or(self.other.as_deref())
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// `host` + `prefix`, the route's name in logs and metrics.
    pub label: crate::metrics::LabelText,
    /// Lower case, without port or trailing dot.
    pub host: Option<String>,
    pub prefix: String,
    pub upstream: Upstream,
    pub public: bool,
    pub preserve_host: bool,
    /// `None`: any valid key is admitted.
    pub scopes: Option<ScopeRule>,
    /// `[routes.cors]`: keygate answers this route's preflights itself.
    pub cors: Option<crate::proxy::cors::Cors>,
    /// The route's metric handles; the gateway fills this in when it takes a snapshot.
    pub metrics: Option<std::sync::Arc<crate::metrics::RouteMetrics>>,
}

impl Route {
    /// A route to a placeholder upstream (`http://127.0.0.1:9`), with no scopes: for tests and
    /// fuzzing of route lookup, where only the host, prefix and `public` matter.
    pub fn placeholder(host: Option<&str>, prefix: &str, public: bool) -> Self {
        let authority = Authority::from_static("127.0.0.1:9");
        Route {
            label: crate::metrics::LabelText(format!("{}{prefix}", host.unwrap_or("")).into()),
            host: host.map(str::to_string),
            prefix: prefix.to_string(),
            upstream: Upstream {
                scheme: Scheme::HTTP,
                authority: authority.clone(),
                base_path: String::new(),
                host_header: HeaderValue::from_static("127.0.0.1:9"),
                transport: crate::proxy::transport::Transport::new(
                    crate::proxy::transport::TransportSpec {
                        scheme: Scheme::HTTP,
                        authority,
                        protocol: crate::proxy::transport::Protocol::Http1,
                        private_ca: None,
                    },
                    crate::proxy::limit::ConnectionLimit::new(512, Default::default()),
                ),
            },
            public,
            preserve_host: false,
            scopes: None,
            cors: None,
            metrics: None,
        }
    }
}

/// Routes ordered for lookup: host-specific before host-less, then longest prefix first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len()))
        });
        Self { routes }
    }

    /// A route for this host wins over a host-less one, as a virtual host does in nginx; among
    /// equals the longest prefix wins. `host` is the request's host name, already parsed
    /// ([`crate::proxy::host`]): no port, no trailing dot.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.locate(host, path).map(|(_, route)| route)
    }

    /// [`Self::find`], with the route's position, by which [`Self::at`] finds it again.
    pub fn locate(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        self.routes.iter().enumerate().find(|(_, route)| {
            let host_ok = match (&route.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && path.starts_with(&route.prefix)
        })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Route> {
        self.routes.iter_mut()
    }

    /// The route at a position [`Self::locate`] gave.
    pub fn at(&self, position: usize) -> Option<&Route> {
        self.routes.get(position)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str) -> Route {
        Route::placeholder(host, prefix, false)
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let table = RouteTable::new(vec![
            route(None, "/"),
            route(None, "/public/"),
            route(Some("api.example.com"), "/"),
        ]);
        let label = |host, path| table.find(host, path).map(|r| r.label.0.to_string());
        assert_eq!(label(None, "/public/x").as_deref(), Some("/public/"));
        assert_eq!(label(None, "/public").as_deref(), Some("/"));
        assert_eq!(label(Some("API.Example.com"), "/public/x").as_deref(), Some("api.example.com/"));
        assert_eq!(label(Some("other"), "/x").as_deref(), Some("/"));
        let only_host = RouteTable::new(vec![route(Some("a"), "/")]);
        assert!(only_host.find(Some("b"), "/").is_none());
        assert!(only_host.find(None, "/").is_none());
    }

    #[test]
    fn scope_rule_fails_closed() {
        let rule = ScopeRule { by_method: vec![(Method::GET, vec!["read".into()].into())], other: None };
        assert!(rule.required(&Method::GET).is_some());
        assert!(rule.required(&Method::POST).is_none());
        let get_lower = Method::from_bytes(b"get").unwrap();
        assert!(rule.required(&get_lower).is_none(), "methods are case-sensitive");
    }
}
