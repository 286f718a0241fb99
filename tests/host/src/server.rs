//! The HTTP side: hyper 1 (HTTP/1.1) on a loopback listener, one fresh component instance per
//! request, Spin's request headers, and per-request statistics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::bindings::fermyon::spin::variables;
use crate::memory::Limiter;
use crate::postgres::PgContext;
use crate::variables::{ComponentVariables, VarError};
use crate::{Outcome, RequestStat};

/// Per-instance store data.
pub struct State {
    pub table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    pub pg: Arc<PgContext>,
    /// Microseconds this request spent waiting on PostgreSQL (query/execute), for `--stats`.
    pub db_micros: Arc<AtomicU64>,
    vars: Arc<ComponentVariables>,
    limiter: Limiter,
    outbound: OutboundHttp,
}

/// Outbound HTTP as Spin allows it: only to the component's `allowed_outbound_hosts`; any other
/// request fails with `HttpRequestDenied`, which is what Spin answers. A self request (Spin:
/// no authority, or the host `self.alt`; wasmtime-wasi-http refuses the first before this hook
/// sees it) needs `http://self` and goes to this host's own listener, as Spin sends it to its
/// own origin.
struct OutboundHttp {
    pg: Arc<PgContext>,
    listen: SocketAddr,
}

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let mut request = request;
        if request
            .uri()
            .host()
            .is_none_or(|h| h.is_empty() || h == "self.alt")
        {
            if !self.pg.allowed.allows_self() {
                return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
            }
            let path = request
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            match format!("http://{}{path}", self.listen).parse() {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => {
                    return Box::new(async {
                        Err(wasmtime_wasi_http::Error::HttpRequestUriInvalid)
                    })
                }
            }
            if let Ok(host) = HeaderValue::from_str(&self.listen.to_string()) {
                request.headers_mut().insert(http::header::HOST, host);
            }
            let default: &mut dyn WasiHttpHooks = Default::default();
            return default.send_request(request, options, fut);
        }
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri.host().unwrap_or("").to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "http" { 80 } else { 443 });
        if !self.pg.allowed.allows(&scheme, &host, port) {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let default: &mut dyn WasiHttpHooks = Default::default();
        default.send_request(request, options, fut)
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl variables::Host for State {
    async fn get(&mut self, name: String) -> Result<String, variables::Error> {
        self.vars.get(&name).map_err(|e| match e {
            VarError::InvalidName(m) => variables::Error::InvalidName(m),
            VarError::Undefined(m) => variables::Error::Undefined(m),
        })
    }
}

pub type Observer = Box<dyn Fn(&RequestStat) + Send + Sync>;

/// The HTTP trigger route of the component.
#[derive(Debug, Clone)]
pub struct Route {
    raw: String,
    /// For `/prefix/...`: "/prefix" (empty for `/...`); None for an exact route.
    wildcard_prefix: Option<String>,
}

impl Route {
    pub fn new(raw: &str) -> Route {
        let wildcard_prefix = raw.strip_suffix("/...").map(str::to_string);
        Route {
            raw: raw.to_string(),
            wildcard_prefix,
        }
    }

    /// The path below the route (`spin-path-info`), or None when the route does not match.
    fn path_info<'p>(&self, path: &'p str) -> Option<&'p str> {
        match &self.wildcard_prefix {
            Some(prefix) => {
                let rest = path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some(rest)
            }
            None => (path == self.raw).then_some(""),
        }
    }

    fn component_route(&self) -> &str {
        self.wildcard_prefix.as_deref().unwrap_or(&self.raw)
    }
}

/// Everything the request handlers share.
pub struct Shared {
    pub pre: ProxyPre<State>,
    pub pg: Arc<PgContext>,
    pub vars: Arc<ComponentVariables>,
    pub env: Vec<(String, String)>,
    pub route: Route,
    pub listen: SocketAddr,
    pub host_peak: Arc<AtomicUsize>,
    pub stats: Mutex<Vec<RequestStat>>,
    pub observer: Option<Observer>,
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("spin-bulk-host: accept failed: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), peer, req));
            // Errors here are client disconnects and aborted bodies; the request log has them.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// How the guest's handler call ended.
#[derive(Debug, Clone)]
enum HandlerEnd {
    Returned,
    Trapped,
}

fn plain(status: StatusCode, text: &'static str) -> Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<StatsBody>, Infallible> {
    let started = Instant::now();
    let request_peak = Arc::new(AtomicUsize::new(0));
    let db_micros = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(None::<HandlerEnd>);
    let rec = Recorder {
        shared: shared.clone(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        status: 0,
        started,
        request_peak: request_peak.clone(),
        db_micros: db_micros.clone(),
        done: done_rx,
    };

    let path = req.uri().path().to_string();
    let Some(path_info) = shared.route.path_info(&path).map(str::to_string) else {
        let _ = done_tx.send(Some(HandlerEnd::Returned));
        return Ok(rec.respond(plain(StatusCode::NOT_FOUND, "")));
    };

    // The headers Spin's HTTP trigger adds (replacing any the client sent under those names).
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| shared.listen.to_string());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let full_url = format!("http://{host}{path_and_query}");
    let spin_headers = [
        ("spin-full-url", full_url.clone()),
        ("spin-path-info", path_info),
        ("spin-matched-route", shared.route.raw.clone()),
        (
            "spin-component-route",
            shared.route.component_route().to_string(),
        ),
        ("spin-raw-component-route", shared.route.raw.clone()),
        ("spin-base-path", "/".to_string()),
        ("spin-client-addr", peer.to_string()),
    ];
    for (name, value) in spin_headers {
        match HeaderValue::from_str(&value) {
            Ok(v) => {
                req.headers_mut().insert(name, v);
            }
            Err(_) => return Ok(rec.respond(plain(StatusCode::BAD_REQUEST, "bad request\n"))),
        }
    }
    // Like Spin, hand the guest an absolute URI so `authority` and `scheme` are known.
    match full_url.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Ok(rec.respond(plain(StatusCode::BAD_REQUEST, "bad request\n"))),
    }

    let mut wasi = WasiCtxBuilder::new();
    wasi.inherit_stdout().inherit_stderr();
    for (k, v) in &shared.env {
        wasi.env(k, v);
    }
    let state = State {
        table: ResourceTable::new(),
        wasi: wasi.build(),
        http: WasiHttpCtx::new(),
        pg: shared.pg.clone(),
        db_micros,
        outbound: OutboundHttp {
            pg: shared.pg.clone(),
            listen: shared.listen,
        },
        vars: shared.vars.clone(),
        limiter: Limiter {
            request_peak,
            host_peak: shared.host_peak.clone(),
        },
    };
    let mut store = Store::new(shared.pre.engine(), state);
    store.limiter(|s| &mut s.limiter);

    let (resp_tx, resp_rx) = oneshot::channel();
    let prepared = (|| -> wasmtime::Result<_> {
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(resp_tx)?;
        Ok((req, out))
    })();
    let (guest_req, out) = match prepared {
        Ok(x) => x,
        Err(e) => {
            eprintln!("spin-bulk-host: could not pass the request to the component: {e:?}");
            let _ = done_tx.send(Some(HandlerEnd::Returned));
            return Ok(rec.respond(plain(StatusCode::BAD_REQUEST, "bad request\n")));
        }
    };

    let pre = shared.pre.clone();
    tokio::spawn(async move {
        let result = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, guest_req, out)
                .await
        }
        .await;
        // Dropping the store drops whatever body the guest still held. An unfinished body whose
        // guest trapped thus ends like a finished one (wasmtime-wasi-http only aborts the
        // stream on an explicit drop of the outgoing-body), which is exactly what Spin shows.
        drop(store);
        let end = match result {
            Ok(()) => HandlerEnd::Returned,
            Err(e) => {
                eprintln!("spin-bulk-host: component trapped: {e:?}");
                HandlerEnd::Trapped
            }
        };
        let _ = done_tx.send(Some(end));
    });

    let resp = match resp_rx.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(code)) => {
            eprintln!("spin-bulk-host: component set an error response: {code:?}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "")
        }
        // The guest trapped (or returned) before setting a response.
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, ""),
    };
    Ok(rec.respond(resp))
}

/// Records a request's statistics once its response body is done with.
struct Recorder {
    shared: Arc<Shared>,
    method: String,
    path: String,
    status: u16,
    started: Instant,
    request_peak: Arc<AtomicUsize>,
    db_micros: Arc<AtomicU64>,
    done: watch::Receiver<Option<HandlerEnd>>,
}

impl Recorder {
    fn respond(mut self, resp: Response<HyperOutgoingBody>) -> Response<StatsBody> {
        self.status = resp.status().as_u16();
        let length = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        resp.map(|inner| StatsBody {
            length,
            sent: 0,
            inner,
            body_end: None,
            rec: Some(self),
        })
    }

    fn record(self, body_end: Option<BodyEnd>, handler: HandlerEnd) {
        let outcome = match (handler, body_end) {
            (HandlerEnd::Trapped, _) => Outcome::Trapped,
            (HandlerEnd::Returned, Some(BodyEnd::Clean)) => Outcome::Finished,
            // Aborted by the guest (dropped without finish) or by the client going away.
            (HandlerEnd::Returned, _) => Outcome::Aborted,
        };
        let stat = RequestStat {
            method: self.method,
            path: self.path,
            status: self.status,
            ms: self.started.elapsed().as_millis() as u64,
            peak_memory: self.request_peak.load(Ordering::Relaxed),
            db_micros: self.db_micros.load(Ordering::Relaxed),
            outcome,
        };
        if let Some(observer) = &self.shared.observer {
            observer(&stat);
        }
        self.shared.stats.lock().unwrap().push(stat);
    }

    fn finish(mut self, body_end: Option<BodyEnd>) {
        let known = self.done.borrow().clone();
        if let Some(end) = known {
            return self.record(body_end, end);
        }
        // The body is done but the guest is still running (e.g. it dropped the body and goes
        // on): record once the handler returns.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let end = match self.done.wait_for(Option::is_some).await {
                    Ok(end) => end.clone().unwrap_or(HandlerEnd::Returned),
                    Err(_) => HandlerEnd::Returned,
                };
                self.record(body_end, end);
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum BodyEnd {
    Clean,
    Error,
}

/// The guest's response body, passed through frame by frame (each write reaches hyper as it
/// happens), noting how it ended.
pub struct StatsBody {
    inner: HyperOutgoingBody,
    /// The body's Content-Length, when it has one: hyper stops polling once that many bytes
    /// went out, so the end of such a body is never seen as a `None` frame.
    length: Option<u64>,
    sent: u64,
    body_end: Option<BodyEnd>,
    rec: Option<Recorder>,
}

impl Body for StatsBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(None) => this.body_end = Some(BodyEnd::Clean),
            Poll::Ready(Some(Err(_))) => this.body_end = Some(BodyEnd::Error),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StatsBody {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.take() {
            // hyper never polls a body that says it is empty from the start.
            let complete = self.inner.is_end_stream() || self.length == Some(self.sent);
            let end = self.body_end.or(complete.then_some(BodyEnd::Clean));
            rec.finish(end);
        }
    }
}
