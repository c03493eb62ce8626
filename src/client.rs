//! Building the operator's Kubernetes client: kube-rs with a request counter and a client-side
//! API budget (queries per second with a burst), so that a burst of launches cannot overwhelm
//! the API server.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kube::Client;
use kube::client::ClientBuilder;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::apicount::{ApiCounter, CountLayer};

/// Client-side rate limit: a token bucket of `burst` tokens refilled at `qps` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiBudget {
    /// Sustained requests per second (0 or less: unlimited).
    pub qps: f64,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
}

impl ApiBudget {
    /// No limit.
    pub const UNLIMITED: ApiBudget = ApiBudget { qps: 0.0, burst: 0 };
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The token bucket, shared by every clone of the client.
#[derive(Debug, Clone)]
pub struct RateLimit {
    budget: ApiBudget,
    bucket: Arc<Mutex<Bucket>>,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(budget: ApiBudget) -> Self {
        let bucket = Bucket {
            tokens: f64::from(budget.burst.max(1)),
            last: Instant::now(),
        };
        Self {
            budget,
            bucket: Arc::new(Mutex::new(bucket)),
        }
    }

    /// Takes a token, possibly on credit, and returns how long to wait before using it.
    pub fn reserve(&self) -> Duration {
        if self.budget.qps <= 0.0 {
            return Duration::ZERO;
        }
        let cap = f64::from(self.budget.burst.max(1));
        let Ok(mut b) = self.bucket.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.budget.qps).min(cap);
        b.last = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.budget.qps)
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Tower layer applying a [`RateLimit`] before each request.
#[derive(Clone)]
pub struct RateLimitLayer(pub RateLimit);

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limit: self.0.clone(),
            reserved: false,
            sleep: None,
        }
    }
}

/// See [`RateLimitLayer`]. The wait happens in `poll_ready`, so requests queue in order.
pub struct RateLimitService<S> {
    inner: S,
    limit: RateLimit,
    reserved: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, B> Service<http::Request<B>> for RateLimitService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.reserved {
            self.reserved = true;
            let wait = self.limit.reserve();
            if !wait.is_zero() {
                self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.reserved = false;
        self.inner.call(req)
    }
}

/// Builds a client from `config` that counts its requests in `counter` and respects `budget`.
pub fn build(
    config: kube::Config,
    counter: ApiCounter,
    budget: ApiBudget,
) -> Result<Client, kube::Error> {
    let builder = ClientBuilder::try_from(config)?;
    Ok(builder
        .with_layer(&RateLimitLayer(RateLimit::new(budget)))
        .with_layer(&CountLayer(counter))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_the_sustained_rate() {
        let rl = RateLimit::new(ApiBudget {
            qps: 10.0,
            burst: 5,
        });
        let start = Instant::now();
        for _ in 0..5 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..10 {
            rl.acquire().await;
        }
        let t = start.elapsed().as_secs_f64();
        assert!(
            (0.99..1.1).contains(&t),
            "10 more at 10 qps take ~1 s, took {t}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let rl = RateLimit::new(ApiBudget::UNLIMITED);
        let start = Instant::now();
        for _ in 0..1000 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
