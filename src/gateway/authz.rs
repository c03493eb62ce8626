//! Authorization: the same rule as the Session admission policy, asked of the API server. A
//! person may use a session if a SubjectAccessReview allows them verb `use` on
//! `users/<spec.user>` (group `cubicle.dev`) in the session's namespace. Answers are cached
//! briefly; any change to RBAC drops the cache and re-checks every open connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::core::Identity;

/// How long an allowed answer is kept (RBAC changes drop it at once).
pub const ALLOWED_TTL: Duration = Duration::from_secs(30);
/// How long a denial is kept.
pub const DENIED_TTL: Duration = Duration::from_secs(2);
const MAX_ENTRIES: usize = 50_000;

type Key = (Identity, String, String);

/// The SubjectAccessReview client with its cache.
pub struct Authorizer {
    client: Client,
    cache: Mutex<HashMap<Key, (bool, Instant)>>,
    /// Number of reviews asked of the API server.
    pub reviews: std::sync::atomic::AtomicU64,
}

impl Authorizer {
    /// A new authorizer.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
            reviews: Default::default(),
        }
    }

    /// Drops every cached answer.
    pub fn forget(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Whether `who` may use sessions of User `user` in `ns` (from the cache when fresh).
    pub async fn may_use(&self, who: &Identity, ns: &str, user: &str) -> Result<bool, kube::Error> {
        let key = (who.clone(), ns.to_string(), user.to_string());
        if let Some((allowed, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            let ttl = if *allowed { ALLOWED_TTL } else { DENIED_TTL };
            if at.elapsed() < ttl {
                return Ok(*allowed);
            }
        }
        let allowed = self.review(who, ns, user).await?;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= MAX_ENTRIES {
            c.clear();
        }
        c.insert(key, (allowed, Instant::now()));
        Ok(allowed)
    }

    /// Asks the API server, bypassing the cache.
    pub async fn review(&self, who: &Identity, ns: &str, user: &str) -> Result<bool, kube::Error> {
        self.reviews
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                groups: (!who.groups.is_empty()).then(|| who.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("cubicle.dev".into()),
                    resource: Some("users".into()),
                    verb: Some("use".into()),
                    name: Some(user.into()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let r = api.create(&PostParams::default(), &sar).await?;
        Ok(r.status
            .is_some_and(|s| s.allowed && s.denied != Some(true)))
    }
}
