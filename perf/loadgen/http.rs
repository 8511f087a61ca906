//! A minimal HTTP/1.1 client for kvgate's own endpoints: POST a JSON body, read the response
//! head, then its body (chunked, sized, or to EOF), split into Server-Sent Events `data:` lines.
//!
//! It only talks to our own server, so it supports exactly what kvgate sends: no redirects, no
//! TLS, no compression, no `100-continue`.
//!
//! Invariant: a connection goes back to the idle pool only after its response was read to the
//! end and the server did not ask to close it, so a pooled connection is always at a message
//! boundary. Concurrency: single-threaded (the generator runs on one `LocalSet`); the pool is a
//! `RefCell` holding at most [`MAX_IDLE_CONNECTIONS`].

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Idle keep-alive connections kept: one per request in flight is the most ever useful, and
/// in-flight requests are capped far below this.
pub const MAX_IDLE_CONNECTIONS: usize = 4096;
/// Longest header or SSE line accepted: kvgate's chunks are well under 1 KiB; a longer line
/// means we are not talking to kvgate.
const MAX_LINE_BYTES: usize = 1 << 20;
/// Largest non-streamed body read (error bodies, `/health`).
const MAX_BODY_BYTES: usize = 4 << 20;
/// Most response headers read: kvgate sends about six.
const MAX_HEADERS: usize = 64;
/// Bytes of the read buffer per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Connection setup and reuse for one server address.
pub struct Client {
    addr: SocketAddr,
    host: String,
    idle: RefCell<Vec<BufReader<TcpStream>>>,
}

/// A response whose head has been read; the body is read through [`Response::sse`] or
/// [`Response::text`].
pub struct Response {
    pub status: u16,
    /// `x-kvgate-worker`: the worker that served the request.
    pub worker: Option<String>,
    body: Body,
}

enum Framing {
    Chunked { left: usize },
    Length(usize),
    UntilClose,
}

struct Body {
    client: Rc<Client>,
    conn: Option<BufReader<TcpStream>>,
    framing: Framing,
    keep_alive: bool,
}

/// The `data:` payloads of an event stream, one at a time.
pub struct Sse {
    body: Body,
    buf: Vec<u8>,
    start: usize,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// `url` is `http://host:port` (a trailing `/` is ignored; no path).
    pub fn new(url: &str) -> anyhow::Result<Rc<Self>> {
        let hostport = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("--url {url:?}: only http:// URLs are supported"))?
            .trim_end_matches('/');
        use std::net::ToSocketAddrs;
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("--url {url:?}: no address"))?;
        Ok(Rc::new(Self { addr, host: hostport.to_string(), idle: RefCell::new(Vec::new()) }))
    }

    async fn connect(&self) -> io::Result<BufReader<TcpStream>> {
        let s = TcpStream::connect(self.addr).await?;
        s.set_nodelay(true)?;
        Ok(BufReader::with_capacity(READ_BUFFER_BYTES, s))
    }

    /// POSTs `body` (JSON) to `path`. A pooled connection the server closed while idle is
    /// retried once on a new connection (the request was never seen by the server).
    pub async fn post(self: &Rc<Self>, path: &str, body: &[u8]) -> io::Result<Response> {
        let mut msg = Vec::with_capacity(body.len() + 160);
        msg.extend_from_slice(format!("POST {path} HTTP/1.1\r\nhost: {}\r\n", self.host).as_bytes());
        msg.extend_from_slice(b"content-type: application/json\r\naccept: text/event-stream\r\n");
        msg.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        msg.extend_from_slice(body);
        let pooled = self.idle.borrow_mut().pop();
        if let Some(conn) = pooled {
            match self.exchange(conn, &msg).await {
                Ok(r) => return Ok(r),
                Err((e, true)) if is_stale(&e) => {}
                Err((e, _)) => return Err(e),
            }
        }
        let conn = self.connect().await?;
        self.exchange(conn, &msg).await.map_err(|(e, _)| e)
    }

    /// Writes the request and reads the head; the error says whether no response byte came.
    async fn exchange(
        self: &Rc<Self>,
        mut conn: BufReader<TcpStream>,
        msg: &[u8],
    ) -> Result<Response, (io::Error, bool)> {
        conn.get_mut().write_all(msg).await.map_err(|e| (e, true))?;
        let mut line = Vec::with_capacity(128);
        let n = read_line(&mut conn, &mut line).await.map_err(|e| (e, true))?;
        if n == 0 {
            return Err((io::ErrorKind::UnexpectedEof.into(), true));
        }
        let head = read_head(&mut conn, &line).await.map_err(|e| (e, false))?;
        let body = Body { client: self.clone(), conn: Some(conn), framing: head.framing, keep_alive: head.keep_alive };
        Ok(Response { status: head.status, worker: head.worker, body })
    }

    fn give_back(&self, conn: BufReader<TcpStream>) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

fn is_stale(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted)
}

struct Head {
    status: u16,
    worker: Option<String>,
    framing: Framing,
    keep_alive: bool,
}

/// Reads one line (through `\n`) into `line`, replacing its content; 0 at EOF.
async fn read_line(conn: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<usize> {
    line.clear();
    let n = (&mut *conn).take(MAX_LINE_BYTES as u64).read_until(b'\n', line).await?;
    if n > 0 && line.last() != Some(&b'\n') {
        return Err(protocol(if n >= MAX_LINE_BYTES { "line too long" } else { "truncated line" }));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(n)
}

async fn read_head(conn: &mut BufReader<TcpStream>, status_line: &[u8]) -> io::Result<Head> {
    let s = std::str::from_utf8(status_line).map_err(|_| protocol("status line is not UTF-8"))?;
    let mut parts = s.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|c| c.parse::<u16>().ok());
    let (Some(status), true) = (status, version.starts_with("HTTP/1.")) else {
        return Err(protocol(format!("bad status line {s:?}")));
    };
    let mut head = Head { status, worker: None, framing: Framing::UntilClose, keep_alive: version == "HTTP/1.1" };
    let mut line = Vec::with_capacity(128);
    for _ in 0..MAX_HEADERS {
        if read_line(conn, &mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line.is_empty() {
            return Ok(head);
        }
        let h = std::str::from_utf8(&line).map_err(|_| protocol("header is not UTF-8"))?;
        let Some((name, value)) = h.split_once(':') else {
            return Err(protocol(format!("bad header {h:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = value.parse().map_err(|_| protocol(format!("bad content-length {value:?}")))?;
                if !matches!(head.framing, Framing::Chunked { .. }) {
                    head.framing = Framing::Length(n);
                }
            }
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") => head.framing = Framing::Chunked { left: 0 },
            "connection" if value.eq_ignore_ascii_case("close") => head.keep_alive = false,
            "x-kvgate-worker" => head.worker = Some(value.to_string()),
            _ => {}
        }
    }
    Err(protocol("too many headers"))
}

impl Body {
    /// Appends the next piece of the body to `out`; `false` at its end, when the connection
    /// has gone back to the pool (or been closed).
    async fn read_some(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let want = match &mut self.framing {
            Framing::Chunked { left: 0 } => {
                let mut line = Vec::with_capacity(16);
                if read_line(conn, &mut line).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let size = std::str::from_utf8(&line).ok().and_then(|l| {
                    let hex = l.split(';').next().unwrap_or("").trim();
                    usize::from_str_radix(hex, 16).ok()
                });
                match size {
                    None => return Err(protocol("bad chunk size")),
                    Some(0) => {
                        // trailers, then the blank line that ends the message
                        loop {
                            if read_line(conn, &mut line).await? == 0 {
                                return Err(io::ErrorKind::UnexpectedEof.into());
                            }
                            if line.is_empty() {
                                break;
                            }
                        }
                        self.finish();
                        return Ok(false);
                    }
                    Some(n) => {
                        self.framing = Framing::Chunked { left: n };
                        n
                    }
                }
            }
            Framing::Chunked { left } => *left,
            Framing::Length(0) => {
                self.finish();
                return Ok(false);
            }
            Framing::Length(n) => *n,
            Framing::UntilClose => usize::MAX,
        };
        let conn = self.conn.as_mut().expect("checked above");
        let avail = conn.fill_buf().await?;
        if avail.is_empty() {
            if matches!(self.framing, Framing::UntilClose) {
                self.keep_alive = false;
                self.finish();
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = avail.len().min(want);
        out.extend_from_slice(&avail[..n]);
        conn.consume(n);
        match &mut self.framing {
            Framing::Chunked { left } => {
                *left -= n;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    conn.read_exact(&mut crlf).await?;
                    if &crlf != b"\r\n" {
                        return Err(protocol("chunk not followed by CRLF"));
                    }
                }
            }
            Framing::Length(left) => *left -= n,
            Framing::UntilClose => {}
        }
        Ok(true)
    }

    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive {
                self.client.give_back(conn);
            }
        }
    }
}

impl Response {
    /// The body as an event stream.
    pub fn sse(self) -> Sse {
        Sse { body: self.body, buf: Vec::with_capacity(READ_BUFFER_BYTES), start: 0 }
    }

    /// The whole body (bounded by [`MAX_BODY_BYTES`]) as text, lossily decoded.
    pub async fn text(mut self) -> io::Result<String> {
        let mut out = Vec::new();
        while self.body.read_some(&mut out).await? {
            if out.len() > MAX_BODY_BYTES {
                return Err(protocol("body too large"));
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Sse {
    /// The next `data:` payload (without the prefix), or `None` at the end of the body.
    pub async fn next_data(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            if let Some((a, b)) = self.next_line() {
                let line = &self.buf[a..b];
                if let Some(d) = line.strip_prefix(b"data:") {
                    let skip = usize::from(d.first() == Some(&b' '));
                    return Ok(Some(&self.buf[b - d.len() + skip..b]));
                }
                continue;
            }
            self.buf.drain(..self.start);
            self.start = 0;
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(protocol("event line too long"));
            }
            if !self.body.read_some(&mut self.buf).await? {
                return Ok(None);
            }
        }
    }

    /// The bounds of the next complete line (without `\r\n`), consumed.
    fn next_line(&mut self) -> Option<(usize, usize)> {
        let rest = &self.buf[self.start..];
        let nl = rest.iter().position(|&c| c == b'\n')?;
        let a = self.start;
        let mut b = a + nl;
        self.start = b + 1;
        if b > a && self.buf[b - 1] == b'\r' {
            b -= 1;
        }
        Some((a, b))
    }

    /// Reads and discards the rest of the body so the connection can be reused.
    pub async fn drain(mut self) -> io::Result<()> {
        let mut sink = Vec::new();
        while self.body.read_some(&mut sink).await? {
            sink.clear();
        }
        Ok(())
    }
}
