//! Reconcile errors. Each variant names the failed operation; `category` is a bounded label
//! for metrics and event reasons.

/// A failed reconcile step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a child object failed.
    #[error("failed to {verb} {kind} {name}")]
    Child {
        /// create, patch, delete.
        verb: &'static str,
        /// Pod, PersistentVolumeClaim...
        kind: &'static str,
        /// Object name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("failed to patch the status of {kind} {name}")]
    Status {
        /// The kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing a finalizer failed.
    #[error("failed to update the finalizers of {kind} {name}")]
    Finalizer {
        /// The kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The object is invalid in a way the API server could not reject.
    #[error("invalid {kind} {name}: {message}")]
    Invalid {
        /// The kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The object has no namespace (all Cubicle kinds are namespaced).
    #[error("{kind} {name} has no namespace")]
    NoNamespace {
        /// The kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
}

impl Error {
    /// A bounded label: `kube`, `invalid`, `conflict`.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Child { source, .. }
            | Error::Status { source, .. }
            | Error::Finalizer { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 403 => "forbidden",
                kube::Error::Api(s) if s.code == 422 => "rejected",
                _ => "kube",
            },
            Error::Invalid { .. } | Error::NoNamespace { .. } => "invalid",
        }
    }

    /// Whether retrying without a change to the object can help.
    pub fn is_transient(&self) -> bool {
        !matches!(self.category(), "invalid" | "rejected")
    }
}

/// Renders an error with its chain of causes, for logs and events.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
