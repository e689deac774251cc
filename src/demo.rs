//! `keygate demo`: an echo upstream and a gateway in front of it with a freshly made key, so a
//! newcomer sees a request pass and a request fail within a minute.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::{config, keys, proxy::Gateway, server};

/// Answers every request with a JSON description of what it received.
async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = serde_json::json!({
        "upstream": "keygate demo echo",
        "method": request.method().as_str(),
        "uri": request.uri().to_string(),
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn run_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

fn demo_dir() -> PathBuf {
    std::env::temp_dir().join(format!("keygate-demo-{}", std::process::id()))
}

pub async fn run(listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo_listener.local_addr()?;
    tokio::spawn(run_echo(echo_listener));

    let (id, key) = keys::generate("kg")?;
    let dir = demo_dir();
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("keygate.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `keygate demo`; see config/keygate.toml for every field.
[server]
listen = "{listen}"

[auth]
keys_file = "keys.toml"
sources = ["header:x-api-key", "authorization:Bearer"]

[[routes]]
prefix = "/public/"
upstream = "http://{echo_addr}"
public = true

[[routes]]
prefix = "/"
upstream = "http://{echo_addr}"
[routes.scopes]
GET = "read"
HEAD = "read"
"*" = "write"
"#
        ),
    )?;
    let created = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)?
        .format(&time::format_description::well_known::Rfc3339)?;
    crate::keys::store::write_private(
        &dir.join("keys.toml"),
        &format!(
            "# Written by `keygate demo`. Only the key's hash is stored.\n[[keys]]\nid = \"{id}\"\nname = \"demo\"\nhash = \"{}\"\ntail = \"{}\"\nscopes = [\"read\"]\ncreated_at = {created}\n",
            keys::hash_key(&key),
            keys::tail(&key).unwrap_or_default(),
        ),
    )?;
    let snapshot = config::load(&config_path)?;
    let gateway = Arc::new(Gateway::new(snapshot));
    let shutdown = server::shutdown_signal();
    let _reloader = crate::reload::spawn(Arc::clone(&gateway))?;
    let listener = server::bind(listen).await?;
    let addr = listener.local_addr()?;
    eprintln!("keygate demo: gateway on http://{addr} in front of an echo upstream on http://{echo_addr}");
    eprintln!("config in {}; a new read-only key (shown once):", dir.display());
    println!("{key}");
    println!("curl -i -H 'x-api-key: {key}' http://{addr}/hello");
    eprintln!("without the key, or with POST (needs scope \"write\"), the gateway refuses. Ctrl-C stops.");
    server::serve(listener, gateway, shutdown).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
