//! The web console (SPEC §10) in a real browser: headless Chromium through chromedriver signs
//! in with an admin token made by `keygate admin token`, creates a key, reads it off the page,
//! uses it on the gateway, revokes it with the page's confirmation, and sees the gateway refuse
//! it; a key whose name is HTML shows as text. Saves a screenshot to `target/console.png`.

mod support;

use std::time::Duration;

use fantoccini::Locator;
use http::Method;
use serde_json::{Value, json};
use support::admin::{AdminGateway, SEED_SECRET};
use support::assert_error;
use support::browser::Browser;

const HOSTILE: &str = "<img src=x onerror=\"document.title='pwned'\">";

/// Polls `expression` (JavaScript) in the page until it is truthy; returns its value. Bounded.
async fn wait_until(browser: &Browser, expression: &str, what: &str) -> Value {
    let script = format!("return ({expression});");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = browser
            .client
            .execute(&script, vec![])
            .await
            .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"));
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            let text = browser.client.execute("return document.body.innerText;", vec![]).await.ok();
            panic!("the console never showed {what} ({expression}); the page says:\n{text:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn css(browser: &Browser, selector: &str) -> fantoccini::elements::Element {
    browser
        .client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("no {selector} on the page: {e}"))
}

/// Fills the create form and submits it; returns (key, id) as the page shows them once.
async fn create_in_page(browser: &Browser, name: &str, expiry: &str) -> (String, String) {
    let field = css(browser, "#create-name").await;
    field.clear().await.expect("clear name");
    field.send_keys(name).await.expect("type a name");
    css(browser, "#create-scopes").await.send_keys("read, write").await.expect("type scopes");
    css(browser, "#create-expiry").await.select_by_value(expiry).await.expect("pick an expiry");
    css(browser, "#create-submit").await.click().await.expect("submit");
    wait_until(browser, "!document.getElementById('new-key').hidden", "the new key").await;
    let key =
        css(browser, "#new-key-value").await.prop("value").await.expect("read the key").unwrap_or_default();
    let warning = css(browser, "#new-key .warning").await.text().await.expect("warning text");
    assert!(warning.contains("will not be shown again"), "{warning}");
    let id = key.split('_').nth(1).unwrap_or_default().to_string();
    css(browser, "#new-key-done").await.click().await.expect("dismiss the key");
    wait_until(browser, &format!("document.querySelector('tr[data-id=\"{id}\"]')"), "the new row").await;
    (key, id)
}

#[tokio::test]
async fn an_operator_creates_uses_and_revokes_a_key_in_the_console() {
    let gate = AdminGateway::start().await;
    let browser = Browser::start().await;
    let client = &browser.client;
    let console = format!("http://{}/console", gate.served.admin);

    client.set_window_size(1280, 900).await.ok();
    client.goto(&console).await.expect("open the console");
    wait_until(&browser, "!document.getElementById('login').hidden", "the token prompt").await;
    css(&browser, "#token").await.send_keys(gate.token("ops")).await.expect("type the token");
    css(&browser, "#login-submit").await.click().await.expect("sign in");
    wait_until(&browser, "document.querySelectorAll('#key-rows tr').length === 1", "the seed key").await;
    let stored: Value = client.execute("return document.cookie;", vec![]).await.expect("cookies");
    assert_eq!(stored, json!(""), "the console sets no cookie");

    // Create, read the key off the page once, and use it.
    let (key, id) = create_in_page(&browser, "browser-made", "30d").await;
    assert!(key.starts_with("kg_") && !id.is_empty(), "{key}");
    let used = gate.use_key(&key).await;
    assert_eq!(used.status, 200, "the key from the page works on the gateway\n{used}");
    assert_eq!(gate.upstream.expect_received(&used).header("x-keygate-key-id"), Some(id.as_str()));
    let page_text: Value = client.execute("return document.body.innerText;", vec![]).await.expect("text");
    assert!(
        !page_text.as_str().unwrap_or_default().contains(&key),
        "the key is gone from the page once dismissed"
    );

    // Filter by the key's last characters: only its row is left.
    let tail = &key[key.len() - 6..];
    css(&browser, "#filter").await.send_keys(tail).await.expect("type a filter");
    wait_until(&browser, "document.querySelectorAll('#key-rows tr').length === 1", "one filtered row").await;
    let row_id =
        wait_until(&browser, "document.querySelector('#key-rows tr').dataset.id", "the row's id").await;
    assert_eq!(row_id, json!(id));

    // Revoke through the page's confirmation; the gateway refuses the key.
    css(&browser, &format!("tr[data-id=\"{id}\"] button.revoke")).await.click().await.expect("click revoke");
    wait_until(&browser, "document.getElementById('confirm').open", "the confirmation").await;
    let question = css(&browser, "#confirm-text").await.text().await.expect("confirmation text");
    assert!(question.contains("browser-made"), "{question}");
    css(&browser, "#confirm-yes").await.click().await.expect("confirm");
    wait_until(
        &browser,
        &format!("document.querySelector('tr[data-id=\"{id}\"] .status.revoked')"),
        "the key as revoked",
    )
    .await;
    assert_error(&gate.use_key(&key).await, 401, "revoked_api_key");
    css(&browser, "#filter").await.clear().await.expect("clear the filter");
    client.execute("document.getElementById('filter').dispatchEvent(new Event('input'));", vec![]).await.ok();

    // A name that is HTML is shown as text: no element made of it, no script run.
    let (_, hostile_id) = create_in_page(&browser, HOSTILE, "never").await;
    let shown = wait_until(
        &browser,
        &format!("document.querySelector('tr[data-id=\"{hostile_id}\"] td.name').textContent"),
        "the hostile name",
    )
    .await;
    assert_eq!(shown, json!(HOSTILE), "the name is shown exactly, as text");
    let images: Value =
        client.execute("return document.querySelectorAll('img').length;", vec![]).await.expect("imgs");
    assert_eq!(images, json!(0), "no element was made from a name");
    let title = client.title().await.expect("title");
    assert!(!title.contains("pwned"), "a name ran as script: {title}");

    // Rotate through the page: a new key is shown once, the old one keeps working for the grace.
    let seed_row = format!("tr[data-id=\"{}\"] button.rotate", support::admin::SEED_ID);
    css(&browser, &seed_row).await.click().await.expect("click rotate");
    wait_until(&browser, "document.getElementById('confirm').open", "the confirmation").await;
    css(&browser, "#confirm-yes").await.click().await.expect("confirm");
    wait_until(&browser, "!document.getElementById('new-key').hidden", "the rotated key").await;
    let rotated =
        css(&browser, "#new-key-value").await.prop("value").await.expect("value").unwrap_or_default();
    assert_eq!(gate.use_key(&rotated).await.status, 200, "the rotated key works");
    assert_eq!(gate.use_key(SEED_SECRET).await.status, 200, "the old key works during the grace");

    // A screenshot of the console with its keys, for people and for the README.
    css(&browser, "#new-key-done").await.click().await.expect("dismiss");
    wait_until(&browser, "document.getElementById('new-key').hidden", "the key dismissed").await;
    let png = client.screenshot().await.expect("a screenshot");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("console.png");
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("cannot save {}: {e}", path.display()));
    eprintln!("console screenshot saved to {}", path.display());

    // Every change the page made is in the audit log under the token's name.
    let actions: Vec<String> = gate
        .audit_lines()
        .iter()
        .map(|l| format!("{}:{}", l["token"].as_str().unwrap_or(""), l["action"]))
        .collect();
    assert_eq!(
        actions,
        ["ops:\"create\"", "ops:\"revoke\"", "ops:\"create\"", "ops:\"rotate\""],
        "{actions:?}"
    );

    // The token is for this tab only: a new session has to give it again.
    client.execute("sessionStorage.clear();", vec![]).await.ok();
    client.goto(&console).await.expect("reopen");
    wait_until(&browser, "!document.getElementById('login').hidden", "the token prompt again").await;
    let listed = gate.api(Method::GET, "/keys").send().await;
    assert_eq!(listed.status, 200);
    browser.close().await;
}
