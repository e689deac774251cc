//! CORS in a real browser (SPEC §2.6): a page on one origin calls the gateway on another with
//! `fetch`, through headless Chromium driven by chromedriver, and reads a 200 and a 401.

mod support;

use support::browser::{Browser, PageServer};
use support::{GatewayConfig, Key, RecordingUpstream, Route};

const SECRET: &str = "browser-secret-5t6y7u8i9o";

const PAGE: &str = "<!doctype html><title>app</title><p>an app on its own origin</p>";

/// Calls the gateway from the page: a keyed POST (a header that is not CORS-safelisted, so the
/// browser sends a preflight first), and a GET without a key (no preflight). Reports what the
/// page could read of each: status, body, and the exposed `x-request-id`.
const SCRIPT: &str = r#"
const [url, key, done] = arguments;
const read = async (response) => ({
  status: response.status,
  body: await response.text(),
  requestId: response.headers.get("x-request-id"),
});
(async () => {
  try {
    const keyed = await fetch(url, {
      method: "POST",
      headers: { "x-api-key": key, "content-type": "text/plain" },
      body: "hello from the page",
    });
    const anonymous = await fetch(url);
    done({ keyed: await read(keyed), anonymous: await read(anonymous), origin: location.origin });
  } catch (error) {
    done({ error: String(error) });
  }
})();
"#;

#[tokio::test]
async fn a_page_on_another_origin_reads_a_200_and_a_401_through_the_gateway() {
    let page = PageServer::start(PAGE).await;
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/api/", &upstream.url()).cors(&format!("allow_origins = [\"{}\"]", page.origin())))
        .key(Key::new("browser1", "browser", SECRET, &["read"]))
        .start()
        .await;
    let browser = Browser::start().await;
    browser.client.goto(&format!("{}/app", page.origin())).await.expect("the page loads");
    let url = format!("http://{}/api/items", gateway.addr);
    let got = browser.run(SCRIPT, vec![url.clone().into(), SECRET.into()]).await;
    browser.close().await;

    let context = format!("the page ({}) calling {url} got: {got:#}", page.origin());
    assert!(got.get("error").is_none(), "fetch failed in the browser (CORS refused?)\n{context}");
    assert_eq!(got["origin"], page.origin().as_str(), "{context}");

    assert_eq!(got["keyed"]["status"], 200, "{context}");
    assert_eq!(got["keyed"]["body"], "hello from the page", "the upstream's echo\n{context}");
    assert!(got["keyed"]["requestId"].is_string(), "x-request-id is exposed\n{context}");

    assert_eq!(got["anonymous"]["status"], 401, "{context}");
    let body: serde_json::Value =
        serde_json::from_str(got["anonymous"]["body"].as_str().unwrap_or("")).expect("a JSON error body");
    assert_eq!(body["error"], "missing_api_key", "{context}");
    assert!(got["anonymous"]["requestId"].is_string(), "x-request-id is exposed on errors\n{context}");

    // Upstream: exactly the keyed POST, with identity and without the key; keygate answered
    // the preflight and refused the anonymous GET itself.
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{context}\nupstream saw: {seen:#?}");
    let post = &seen[0];
    assert_eq!(post.method, http::Method::POST, "{post:?}");
    assert_eq!(post.header("x-keygate-key-id"), Some("browser1"), "{post:?}");
    assert_eq!(post.header("origin"), Some(page.origin().as_str()), "{post:?}");
    assert!(post.header("x-api-key").is_none(), "{post:?}");
    assert_eq!(&post.body[..], b"hello from the page", "{post:?}");
}
