//! Reconcile errors. Each variant names the failed operation; [`Category`] is a bounded label
//! for metrics and event reasons.

/// What a write to a child object did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// A create.
    Create,
    /// A (merge or JSON) patch.
    Patch,
    /// A server-side apply.
    Apply,
    /// A delete.
    Delete,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Create => "create",
            Verb::Patch => "patch",
            Verb::Apply => "apply",
            Verb::Delete => "delete",
        })
    }
}

/// The category of an error: a bounded set, for metrics labels and for the retry decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// Any other API or transport failure.
    Kube,
    /// The object changed under the write (409).
    Conflict,
    /// Not permitted (403).
    Forbidden,
    /// The API server rejected the object as written (422).
    Rejected,
    /// The object is invalid in a way only the operator sees.
    Invalid,
}

impl Category {
    /// The label: `kube`, `conflict`, `forbidden`, `rejected`, `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Kube => "kube",
            Category::Conflict => "conflict",
            Category::Forbidden => "forbidden",
            Category::Rejected => "rejected",
            Category::Invalid => "invalid",
        }
    }
}

/// A failed reconcile step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a child object failed.
    #[error("failed to {verb} {kind} {name}")]
    Child {
        /// What the write did.
        verb: Verb,
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
    /// Its category.
    pub fn category(&self) -> Category {
        match self {
            Error::Child { source, .. }
            | Error::Status { source, .. }
            | Error::Finalizer { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => Category::Conflict,
                kube::Error::Api(s) if s.code == 403 => Category::Forbidden,
                kube::Error::Api(s) if s.code == 422 => Category::Rejected,
                _ => Category::Kube,
            },
            Error::Invalid { .. } | Error::NoNamespace { .. } => Category::Invalid,
        }
    }

    /// Whether retrying without a change to the object can help.
    pub fn is_transient(&self) -> bool {
        !matches!(self.category(), Category::Invalid | Category::Rejected)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", "y")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn categories_are_bounded_and_decide_the_retry() {
        let child = |code| Error::Child {
            verb: Verb::Create,
            kind: "Pod",
            name: "p".into(),
            source: api(code),
        };
        assert_eq!(child(409).category(), Category::Conflict);
        assert_eq!(child(403).category(), Category::Forbidden);
        assert_eq!(child(422).category(), Category::Rejected);
        assert_eq!(child(500).category(), Category::Kube);
        assert!(child(409).is_transient());
        assert!(!child(422).is_transient());
        let invalid = Error::NoNamespace {
            kind: "Session",
            name: "s".into(),
        };
        assert_eq!(invalid.category().as_str(), "invalid");
        assert!(!invalid.is_transient());
        assert_eq!(child(409).to_string(), "failed to create Pod p");
    }
}
