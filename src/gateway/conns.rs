//! Open connections, per session: the activity that keeps a session alive, and the handles
//! that close them when the session stops, pauses, expires, is deleted, or the person loses
//! access.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::core::Identity;

/// A session's key: `namespace/name`, and its uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Namespace.
    pub ns: String,
    /// Name.
    pub name: String,
    /// Uid (a re-created session of the same name is another session).
    pub uid: String,
    /// `spec.user`.
    pub user: String,
}

struct Conn {
    who: Arc<Identity>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct PerSession {
    conns: HashMap<u64, Conn>,
    /// The last keepalive this gateway wrote.
    written: Option<Timestamp>,
}

/// Every open connection of this gateway.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<SessionKey, PerSession>>,
    next: AtomicU64,
    /// Woken when a session gets its first connection (the keepalive writer looks at it).
    pub opened: tokio::sync::Notify,
    /// Connections closed by the gateway (not by their ends).
    pub closed_by_gateway: AtomicU64,
}

/// One open connection; dropping it unregisters it.
pub struct Guard {
    registry: Arc<Registry>,
    key: SessionKey,
    id: u64,
    /// Cancelled when the gateway closes the connection.
    pub cancel: CancellationToken,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut s = self
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(per) = s.get_mut(&self.key) {
            per.conns.remove(&self.id);
            if per.conns.is_empty() {
                s.remove(&self.key);
            }
        }
    }
}

impl Registry {
    /// Registers a connection of `who` to `key`.
    pub fn open(self: &Arc<Self>, key: SessionKey, who: Arc<Identity>) -> Guard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let first = {
            let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let per = s.entry(key.clone()).or_default();
            per.conns.insert(
                id,
                Conn {
                    who,
                    cancel: cancel.clone(),
                },
            );
            per.conns.len() == 1
        };
        if first {
            self.opened.notify_one();
        }
        Guard {
            registry: self.clone(),
            key,
            id,
            cancel,
        }
    }

    /// Sessions with at least one open connection.
    pub fn sessions(&self) -> Vec<SessionKey> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Number of open connections.
    pub fn count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.conns.len())
            .sum()
    }

    /// The distinct people connected to `key`.
    pub fn people(&self, key: &SessionKey) -> Vec<Arc<Identity>> {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<Identity>> = Vec::new();
        if let Some(per) = s.get(key) {
            for c in per.conns.values() {
                if !out.iter().any(|o| o == &c.who) {
                    out.push(c.who.clone());
                }
            }
        }
        out
    }

    /// Closes every connection to `key` (of `who` only, if given); returns how many.
    pub fn close(&self, key: &SessionKey, who: Option<&Identity>) -> usize {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        if let Some(per) = s.get(key) {
            for c in per.conns.values() {
                if who.is_none_or(|w| *c.who == *w) && !c.cancel.is_cancelled() {
                    c.cancel.cancel();
                    n += 1;
                }
            }
        }
        self.closed_by_gateway
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The last keepalive this gateway wrote for `key`.
    pub fn written(&self, key: &SessionKey) -> Option<Timestamp> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .and_then(|p| p.written)
    }

    /// Records a keepalive written for `key`.
    pub fn record_written(&self, key: &SessionKey, at: Timestamp) {
        if let Some(p) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)
        {
            p.written = Some(p.written.map_or(at, |w| w.max(at)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> SessionKey {
        SessionKey {
            ns: "ns".into(),
            name: n.into(),
            uid: format!("uid-{n}"),
            user: "alice".into(),
        }
    }

    fn who(u: &str) -> Arc<Identity> {
        Arc::new(Identity {
            username: u.into(),
            groups: vec![],
        })
    }

    #[test]
    fn connections_register_until_dropped_and_close_by_session_or_person() {
        let r = Arc::new(Registry::default());
        let a1 = r.open(key("a"), who("alice"));
        let a2 = r.open(key("a"), who("bob"));
        let b = r.open(key("b"), who("alice"));
        assert_eq!(r.count(), 3);
        assert_eq!(r.people(&key("a")).len(), 2);
        assert_eq!(r.close(&key("a"), Some(&who("bob"))), 1);
        assert!(a2.cancel.is_cancelled() && !a1.cancel.is_cancelled());
        assert_eq!(r.close(&key("a"), None), 1);
        assert!(a1.cancel.is_cancelled() && !b.cancel.is_cancelled());
        drop((a1, a2));
        assert_eq!(r.sessions(), vec![key("b")]);
        r.record_written(&key("b"), Timestamp::from_second(10).unwrap());
        r.record_written(&key("b"), Timestamp::from_second(5).unwrap());
        assert_eq!(
            r.written(&key("b")),
            Some(Timestamp::from_second(10).unwrap())
        );
        drop(b);
        assert_eq!(r.count(), 0);
    }
}
