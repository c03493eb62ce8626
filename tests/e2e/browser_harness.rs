//! The browser harness itself: headless Chromium runs a page's script, fills and posts a form,
//! follows the redirect and takes a screenshot. Served from loopback by the test, so it needs no
//! control plane; the tests that drive Cubicle's pages build on the same [`Browser`].

use std::time::Duration;

use axum::Router;
use axum::response::{Html, Redirect};
use axum::routing::get;

use crate::browser::Browser;

const PAGE: &str = r#"<!doctype html><html><head><title>harness</title></head><body>
<p id="js">no script</p>
<form method="post" action="/said"><label>Word <input id="word" name="word"></label>
<button id="send" type="submit">Send</button></form>
<script>document.getElementById('js').textContent = 'script ran ' + (6 * 7);</script>
</body></html>"#;

async fn said(body: String) -> Redirect {
    // The form is urlencoded: word=<value>.
    let word = body.strip_prefix("word=").unwrap_or("").to_string();
    Redirect::to(&format!("/shown?{word}"))
}

async fn shown(uri: axum::http::Uri) -> Html<String> {
    Html(format!(
        "<p id=\"shown\">you said {}</p>",
        uri.query().unwrap_or("")
    ))
}

#[tokio::test]
async fn chromium_runs_scripts_posts_forms_and_takes_screenshots() {
    let Some(browser) = Browser::start("browser_harness").await else {
        return;
    };
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/said", axum::routing::post(said))
        .route("/shown", get(shown));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    browser.goto(&format!("http://{addr}/")).await;
    let ran = browser
        .wait_until("return document.getElementById('js').textContent.startsWith('script ran') && document.getElementById('js').textContent", Duration::from_secs(10))
        .await;
    assert_eq!(ran, "script ran 42", "the page's script did not run");

    browser.fill("#word", "cubicle").await;
    browser.click("#send").await;
    let shown = browser
        .wait_until(
            "const e = document.getElementById('shown'); return e && e.textContent",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        shown, "you said cubicle",
        "the posted form did not come back"
    );
    assert!(
        browser.url().await.ends_with("/shown?cubicle"),
        "no redirect after the post: {}",
        browser.url().await
    );

    let shot = browser.screenshot("form-posted").await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "not a PNG: {} bytes",
        png.len()
    );
    browser.close().await;
}
