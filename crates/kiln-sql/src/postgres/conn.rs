//! Opening the session: every host of the URL in turn (TCP with keep-alive
//! and `TCP_NODELAY`, or a Unix socket), TLS per `sslmode`, and the task that
//! drives the connection. Also how driver errors read in messages.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::error::DbError;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{SslMode, TlsSetup};

/// Time allowed for one host's TCP connect, TLS handshake and authentication
/// when the URL sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `SQLSTATE: message`, with the server's detail and hint when it gave them.
pub(super) fn db_message(db: &DbError) -> String {
    let mut s = format!("{}: {}", db.code().code(), db.message());
    if let Some(d) = db.detail() {
        let _ = write!(s, " DETAIL: {d}");
    }
    if let Some(h) = db.hint() {
        let _ = write!(s, " HINT: {h}");
    }
    s
}

/// The driver's message with its causes: tokio-postgres' own `Display` stops
/// at the kind ("error performing TLS handshake") and leaves out the reason.
pub(super) fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db_message(db);
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// Whether the session is gone (or going): closed channel, socket error, or a
/// server error of the connection-exception (08) / operator-intervention (57P)
/// classes, or any FATAL.
pub(super) fn is_connection_loss(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || code.starts_with("57P") || matches!(db.severity(), "FATAL" | "PANIC");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// An established session.
pub(super) struct Opened {
    pub(super) client: Client,
    pub(super) task: JoinHandle<()>,
    pub(super) error: Arc<Mutex<Option<String>>>,
}

/// Drive the connection on its own task. Server notices (`RAISE NOTICE`) go to
/// the log; the error that ends the connection is kept so that the next
/// request, which fails with "connection closed", can say why.
fn spawn_connection<S, T>(mut conn: Connection<S, T>) -> (JoinHandle<()>, Arc<Mutex<Option<String>>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let task = tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(n))) => tracing::info!(target: "kiln::postgres", "{}: {}", n.severity(), n.message()),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(target: "kiln::postgres", error = %e, "connection ended");
                    if let Ok(mut g) = out.lock() {
                        *g = Some(error_text(&e));
                    }
                    return;
                }
                None => return,
            }
        }
    });
    (task, slot)
}

/// Try every host of the configuration in order; the first session wins.
pub(super) async fn open(pg: &Config, tls: &TlsSetup) -> Result<Opened, String> {
    let hosts: Vec<Host> = if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() { default_hosts(pg) } else { pg.get_hosts().to_vec() };
    let addrs = pg.get_hostaddrs();
    let ports = pg.get_ports();
    let n = hosts.len().max(addrs.len());
    let timeout = pg.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut errors = Vec::new();
    for i in 0..n {
        let port = match ports {
            [] => 5432,
            [one] => *one,
            many => *many.get(i).unwrap_or(&5432),
        };
        let host = hosts.get(i);
        let addr = addrs.get(i).copied();
        let label = match (host, addr) {
            (Some(Host::Tcp(h)), _) => format!("{h}:{port}"),
            #[cfg(unix)]
            (Some(Host::Unix(p)), _) => p.join(format!(".s.PGSQL.{port}")).display().to_string(),
            (None, Some(a)) => SocketAddr::new(a, port).to_string(),
            (None, None) => continue,
        };
        match tokio::time::timeout(timeout, open_one(pg, tls, host, addr, port)).await {
            Ok(Ok(o)) => return Ok(o),
            Ok(Err(e)) => errors.push(format!("{label}: {e}")),
            Err(_) => errors.push(format!("{label}: timed out after {timeout:?}")),
        }
    }
    Err(errors.join("; "))
}

/// libpq's default when the URL names no host: the local Unix socket if there
/// is one, else localhost over TCP.
fn default_hosts(pg: &Config) -> Vec<Host> {
    #[cfg(unix)]
    {
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        for dir in ["/var/run/postgresql", "/tmp"] {
            if Path::new(dir).join(format!(".s.PGSQL.{port}")).exists() {
                return vec![Host::Unix(PathBuf::from(dir))];
            }
        }
    }
    let _ = pg;
    vec![Host::Tcp("localhost".into())]
}

async fn open_one(pg: &Config, tls: &TlsSetup, host: Option<&Host>, addr: Option<IpAddr>, port: u16) -> Result<Opened, String> {
    let mut cfg = pg.clone();
    let tcp_name = match host {
        #[cfg(unix)]
        Some(Host::Unix(dir)) => {
            // TLS is pointless (and unsupported by the server) on a local socket.
            cfg.ssl_mode(PgSslMode::Disable);
            let stream = tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await.map_err(|e| e.to_string())?;
            let (client, conn) = cfg.connect_raw(stream, NoTls).await.map_err(|e| error_text(&e))?;
            let (task, error) = spawn_connection(conn);
            return Ok(Opened { client, task, error });
        }
        Some(Host::Tcp(h)) => h.clone(),
        None => addr.map(|a| a.to_string()).unwrap_or_default(),
    };
    let targets: Vec<SocketAddr> = match addr {
        Some(a) => vec![SocketAddr::new(a, port)],
        None => tokio::net::lookup_host((tcp_name.as_str(), port)).await.map_err(|e| format!("cannot resolve host: {e}"))?.collect(),
    };
    let mut last = format!("cannot resolve host {tcp_name}");
    let mut stream = None;
    for t in &targets {
        match connect_tcp(*t).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = if targets.len() > 1 { format!("{t}: {e}") } else { e.to_string() },
        }
    }
    let stream = stream.ok_or(last)?;
    // Without TCP_NODELAY the small TLS handshake and startup messages wait on
    // Nagle's algorithm against the server's delayed ACK: ~40-90 ms per connection.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    cfg.ssl_mode(tls.pg_mode());
    match &tls.connector {
        None => {
            let (client, conn) = cfg.connect_raw(stream, NoTls).await.map_err(|e| error_text(&e))?;
            let (task, error) = spawn_connection(conn);
            Ok(Opened { client, task, error })
        }
        Some(maker) => {
            let mut maker = maker.clone();
            let tls_connect = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut maker, &tcp_name)
                .map_err(|e| format!("{tcp_name} cannot be used as a TLS server name: {e}"))?;
            let (client, conn) = cfg.connect_raw(stream, tls_connect).await.map_err(|e| {
                let mut m = error_text(&e);
                if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && m.contains("certificate") {
                    m.push_str(
                        " (the server's certificate is checked against sslrootcert=<PEM file>, else ~/.postgresql/root.crt, \
                         else the public web roots; sslmode=require encrypts without checking it)",
                    );
                }
                m
            })?;
            let (task, error) = spawn_connection(conn);
            Ok(Opened { client, task, error })
        }
    }
}

async fn connect_tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Lets the OS notice a peer that vanished during a long migration.
    socket.set_keepalive(true)?;
    socket.connect(addr).await
}
