//! Counting the operator's own Kubernetes API requests, by verb and resource.
//!
//! A tower layer on the client: every request is classified (`create`, `patch`, `update`,
//! `delete`, `get`, `list`, `watch`) with its resource (`pods`, `sessions/status`, ...) and
//! counted. The counts feed the `cubicle_api_requests_total` metric and the launch-cost tests
//! and benchmark ("writes per launch").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

/// A request's kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    /// `create`, `patch`, `update`, `delete`, `deletecollection`, `get`, `list` or `watch`.
    pub verb: &'static str,
    /// Resource with subresource, e.g. `pods` or `sessions/status`.
    pub resource: String,
}

impl RequestKey {
    /// Whether the verb changes state.
    pub fn is_write(&self) -> bool {
        !matches!(self.verb, "get" | "list" | "watch")
    }
}

/// Shared counters; cheap to clone.
#[derive(Clone, Default)]
pub struct ApiCounter {
    counts: Arc<Mutex<BTreeMap<RequestKey, u64>>>,
    hook: Option<Arc<dyn Fn(&RequestKey) + Send + Sync>>,
}

impl std::fmt::Debug for ApiCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCounter")
            .field("counts", &self.snapshot())
            .finish()
    }
}

impl ApiCounter {
    /// A counter that also calls `hook` for each request (used to feed metrics).
    pub fn with_hook(hook: impl Fn(&RequestKey) + Send + Sync + 'static) -> Self {
        Self {
            counts: Arc::default(),
            hook: Some(Arc::new(hook)),
        }
    }

    /// A copy of the counts so far.
    pub fn snapshot(&self) -> BTreeMap<RequestKey, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Total writes so far.
    pub fn writes(&self) -> u64 {
        self.snapshot()
            .iter()
            .filter(|(k, _)| k.is_write())
            .map(|(_, v)| v)
            .sum()
    }

    fn record(&self, key: RequestKey) {
        if let Some(h) = &self.hook {
            h(&key);
        }
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(key).or_default() += 1;
        }
    }
}

/// Classifies a request by method, path and query.
pub fn classify(method: &http::Method, path: &str, query: Option<&str>) -> RequestKey {
    // /api/v1/[namespaces/NS/]RES[/NAME[/SUB]] or /apis/G/V/[namespaces/NS/]RES[/NAME[/SUB]]
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.first() {
        Some(&"api") if segs.len() >= 2 => &segs[2..],
        Some(&"apis") if segs.len() >= 3 => &segs[3..],
        _ => &[],
    };
    // A namespace object itself is /api/v1/namespaces/NAME; a namespaced resource has 3+ more.
    let rest = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        &rest[2..]
    } else {
        rest
    };
    let (resource, named) = match rest {
        [] => ("".to_string(), false),
        [res] => (res.to_string(), false),
        [res, _name] => (res.to_string(), true),
        [res, _name, sub, ..] => (format!("{res}/{sub}"), true),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    };
    RequestKey { verb, resource }
}

/// The tower layer.
#[derive(Clone)]
pub struct CountLayer(pub ApiCounter);

impl<S> Layer<S> for CountLayer {
    type Service = CountService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountService {
            inner,
            counter: self.0.clone(),
        }
    }
}

/// The service the layer wraps around the client's HTTP stack.
#[derive(Clone)]
pub struct CountService<S> {
    inner: S,
    counter: ApiCounter,
}

impl<S, B> Service<Request<B>> for CountService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.counter
            .record(classify(req.method(), req.uri().path(), req.uri().query()));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn c(m: Method, p: &str, q: Option<&str>) -> (&'static str, String) {
        let k = classify(&m, p, q);
        (k.verb, k.resource)
    }

    #[test]
    fn classifies_core_and_group_paths() {
        assert_eq!(
            c(Method::POST, "/api/v1/namespaces/a/pods", None),
            ("create", "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/a/pods/p", None),
            ("get", "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/pods", Some("watch=true&rv=1")),
            ("watch", "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/pods", Some("limit=500")),
            ("list", "pods".into())
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/cubicle.dev/v1alpha1/namespaces/a/sessions/s/status",
                None
            ),
            ("patch", "sessions/status".into())
        );
        assert_eq!(
            c(Method::DELETE, "/api/v1/namespaces/a/pods/p", None),
            ("delete", "pods".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/a", None),
            ("get", "namespaces".into())
        );
        assert_eq!(
            c(Method::GET, "/api/v1/nodes", None),
            ("list", "nodes".into())
        );
        assert!(classify(&Method::PATCH, "/api/v1/nodes/n", None).is_write());
        assert!(!classify(&Method::GET, "/api/v1/nodes/n", None).is_write());
    }
}
