//! The pages the gateway answers with itself.

use http::{Response, StatusCode, header};

use super::proxy::{Body, full};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An HTML page (`refresh`: reload after so many seconds).
pub fn page(status: StatusCode, title: &str, body: &str, refresh: Option<u32>) -> Response<Body> {
    let refresh = refresh
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{t} · Cubicle</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;color:#222}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = escape(title),
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-frame-options", "DENY")
        .body(full(html))
        .expect("a static response")
}

/// The same answer for a session that does not exist and one the person may not use.
pub fn not_found() -> Response<Body> {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "<p>There is no session here.</p>",
        None,
    )
}

/// The desktop is starting.
pub fn pending() -> Response<Body> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting",
        "<p>The session is starting. This page connects as soon as it runs.</p>",
        Some(1),
    )
}

/// The session is stopped.
pub fn stopped(resume_allowed: bool, ns: &str, name: &str) -> Response<Body> {
    let how = if resume_allowed {
        format!(
            "<p>Resume it by setting its state to Running, e.g. <code>kubectl -n {} patch \
             session {} --type merge -p '{{\"spec\":{{\"state\":\"Running\"}}}}'</code>; this \
             page connects once it runs.</p>",
            escape(ns),
            escape(name)
        )
    } else {
        "<p>Your groups do not allow resuming it (allowKasmStop).</p>".into()
    };
    page(
        StatusCode::CONFLICT,
        "Stopped",
        &format!("<p>The session is stopped: its pod was removed, its volumes kept.</p>{how}"),
        resume_allowed.then_some(5),
    )
}

/// The session is paused.
pub fn paused(reason: &str) -> Response<Body> {
    page(
        StatusCode::FORBIDDEN,
        "Paused",
        &format!("<p>{}</p>", escape(reason)),
        None,
    )
}

/// The session is over.
pub fn ended(reason: &str) -> Response<Body> {
    page(
        StatusCode::GONE,
        "Session ended",
        &format!("<p>{}</p>", escape(reason)),
        None,
    )
}

/// The desktop does not answer.
pub fn unreachable() -> Response<Body> {
    page(
        StatusCode::BAD_GATEWAY,
        "Not answering",
        "<p>The session's desktop does not answer yet.</p>",
        Some(2),
    )
}

/// The gateway's caches are not synced yet.
pub fn not_ready() -> Response<Body> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting",
        "<p>The gateway is starting.</p>",
        Some(1),
    )
}

/// A redirect.
pub fn redirect(to: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(""))
        .expect("a static response")
}
