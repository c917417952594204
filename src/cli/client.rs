//! A minimal HTTP/1.1 client of the control socket (hyper over a Unix stream).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Sends one request; a non-2xx answer becomes an error with the API's message.
pub async fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let data = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "cryptvol")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(data)))?;
    send(socket, req).await
}

/// Streams a body from a channel of chunks (volume import).
pub async fn call_stream(
    socket: &Path,
    path: &str,
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> Result<Value> {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "cryptvol")
        .header("content-type", "application/octet-stream")
        .body(ChannelBody(rx))?;
    send(socket, req).await
}

/// A request body fed by a channel: the reader thread sends chunks as it reads the file.
struct ChannelBody(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// One HTTP/1.1 request on a fresh connection to the control socket.
async fn exchange<B>(socket: &Path, req: Request<B>) -> Result<hyper::Response<Incoming>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the daemon at {} (is `cryptvol serve` running?)",
                socket.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// The JSON body of an answer; an error answer becomes an error with the API's message.
async fn json_answer(resp: hyper::Response<Incoming>) -> Result<Value> {
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| anyhow!("daemon answered {status} with a non-JSON body"))?;
    if !status.is_success() {
        let msg = v["error"]["error_msg"].as_str().unwrap_or("unknown error");
        let code = v["error"]["error_code"].as_str().unwrap_or("?");
        return Err(anyhow!("{msg} ({code})"));
    }
    Ok(v)
}

async fn send<B>(socket: &Path, req: Request<B>) -> Result<Value>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    json_answer(exchange(socket, req).await?).await
}

/// `GET` of a streamed answer (volume export): the response, its status checked (an error
/// answer is JSON and becomes an error with the API's message).
pub async fn get_stream(socket: &Path, path: &str) -> Result<hyper::Response<Incoming>> {
    let req = Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "cryptvol")
        .body(Full::new(Bytes::new()))?;
    let resp = exchange(socket, req).await?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    json_answer(resp).await?;
    Err(anyhow!("daemon answered {status}"))
}
