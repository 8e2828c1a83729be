//! Mutual TLS for every connection of a migration (QEMU's `tls-creds`,
//! Cloud Hypervisor's mutual TLS), with `rustls`: each side presents a
//! certificate that the other checks against the CA it trusts, and the
//! destination requires the source's. The CRCs of the stream catch
//! accidents; TLS catches tampering: a record whose authentication fails
//! ends its connection, and so the migration.
//!
//! The migration's code reads and writes plain `TcpStream`s (deadlines,
//! keepalive, a reader thread beside a writer). So TLS runs in a pump
//! thread per connection, between the network's socket and a loopback
//! socket pair whose other end the migration gets: the source dials with
//! a [`Dialer`], the destination accepts behind a [`TlsListener`]. The
//! price is one more copy through the kernel per byte; `bench migrate
//! --tls` measures TLS with it.
//!
//! ```text
//!  migration ─ loopback ─ pump ═══ TLS over TCP ═══ pump ─ loopback ─ migration
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

/// Why TLS could not be set up, or a connection's TLS failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A credentials file could not be read or parsed.
    #[error("{what} {path}: {why}")]
    Credentials {
        /// Which file: the certificate, the key, the CA.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        why: String,
    },
    /// `rustls` refused the configuration or the connection.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The handshake did not complete.
    #[error("TLS handshake with {peer}: {why}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why.
        why: String,
    },
    /// The socket failed.
    #[error("TLS connection I/O")]
    Io(#[from] io::Error),
}

/// One side's credentials: its certificate chain and key, the CA it trusts
/// for the other's, and the name the destination's certificate must bear.
#[derive(Debug)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// What went wrong on this side's TLS connections (handshakes that
    /// failed, records that failed their authentication), for the report.
    failures: Mutex<Vec<String>>,
}

fn pem_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(String) -> TlsError + 'a {
    move |why| TlsError::Credentials { what, path: path.display().to_string(), why }
}

impl TlsConfig {
    /// Reads PEM files: `cert` (this side's chain), `key` (its private
    /// key), `ca` (the certificates it trusts for the peer's).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err("certificate", cert)(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err("certificate", cert)(e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err("certificate", cert)("no certificate in it".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("key", key)(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err("CA", ca)(e.to_string()))? {
            roots.add(c.map_err(|e| pem_err("CA", ca)(e.to_string()))?)?;
        }
        if roots.is_empty() {
            return Err(pem_err("CA", ca)("no certificate in it".into()));
        }
        Self::new(chain, key, roots)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, TlsError> {
        // `ring`, not `aws-lc-rs`: it builds in seconds where aws-lc builds
        // a C library for minutes on a 2-core host. rustls deprecates its
        // default set for lacking post-quantum key exchange (X25519MLKEM768),
        // which only aws-lc-rs offers: a choice the docs state.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Tls(rustls::Error::General(e.to_string())))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self { client: Arc::new(client), server: Arc::new(server), failures: Mutex::default() })
    }

    /// What failed on this side's TLS connections so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failed(&self, why: String) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(why);
    }
}

/// How the source opens its connections to the destination: plain TCP, or
/// TLS to a destination whose certificate bears `name`.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<(Arc<TlsConfig>, String, SocketAddr)>,
}

impl Dialer {
    /// TLS with `config` to the destination at `addr`, its certificate
    /// checked for `name` (its host name or address).
    pub fn tls(config: Arc<TlsConfig>, name: String, addr: SocketAddr) -> Self {
        Self { tls: Some((config, name, addr)) }
    }

    /// Where a TLS dialer goes: the connections it makes are loopback ends
    /// of its pumps, whose peer is not the destination.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.2)
    }

    /// A connection to `addr`, within `timeout` (connecting, and the TLS
    /// handshake): the plain socket the migration reads and writes.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream, TlsError> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        let Some((config, name, _)) = &self.tls else { return Ok(tcp) };
        let server = ServerName::try_from(name.clone()).map_err(|e| TlsError::Handshake {
            peer: addr.to_string(),
            why: format!("name {name:?}: {e}"),
        })?;
        let conn = ClientConnection::new(config.client.clone(), server)?;
        let tls = handshake(Connection::Client(conn), &tcp, timeout).map_err(|why| {
            let e = TlsError::Handshake { peer: addr.to_string(), why };
            config.failed(e.to_string());
            e
        })?;
        let (mine, theirs) = loopback_pair()?;
        let config = config.clone();
        std::thread::Builder::new().name("migrate-tls".into()).spawn(move || {
            if let Err(why) = pump(tls, tcp, theirs) {
                config.failed(format!("TLS connection to {addr}: {why}"));
            }
        })?;
        Ok(mine)
    }
}

/// The destination's side: accepts TLS connections on a public listener,
/// checks each peer's certificate, and passes the plain end of each to a
/// loopback listener ([`TlsListener::local`]) that the migration accepts
/// on, as it would on the public one.
pub struct TlsListener {
    local: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long a peer has for its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    /// Serves TLS on `public` with `config`.
    pub fn start(public: TcpListener, config: Arc<TlsConfig>) -> io::Result<Self> {
        let local = TcpListener::bind("127.0.0.1:0")?;
        let to = local.local_addr()?;
        public.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("migrate-tls-accept".into()).spawn(move || {
            // Relaxed: the flag carries no data.
            while !s.load(Ordering::Relaxed) {
                let Ok((tcp, peer)) = public.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let config = config.clone();
                let _ = std::thread::Builder::new().name("migrate-tls".into()).spawn(move || {
                    if let Err(why) = serve(tcp, to, &config) {
                        config.failed(format!("TLS connection from {peer}: {why}"));
                    }
                });
            }
        })?;
        Ok(Self { local, stop, thread: Some(thread) })
    }

    /// The loopback listener the migration accepts on.
    pub fn local(&self) -> &TcpListener {
        &self.local
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One accepted TLS connection: the handshake (the peer's certificate
/// required), then the pump to a new connection to `to`.
fn serve(tcp: TcpStream, to: SocketAddr, config: &TlsConfig) -> Result<(), String> {
    tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
    let conn = ServerConnection::new(config.server.clone()).map_err(|e| e.to_string())?;
    let tls = handshake(Connection::Server(conn), &tcp, HANDSHAKE_TIMEOUT)?;
    let plain = TcpStream::connect(to).map_err(|e| e.to_string())?;
    pump(tls, tcp, plain)
}

/// Runs `tls`'s handshake over `tcp` within `timeout`.
fn handshake(mut tls: Connection, tcp: &TcpStream, timeout: Duration) -> Result<Connection, String> {
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut t = tcp;
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut t) {
            // Tell the peer why, if rustls has an alert to send.
            let _ = tls.write_tls(&mut t);
            return Err(e.to_string());
        }
    }
    // In TLS 1.3 the client is done before the server has checked its
    // certificate: wait for the server's verdict, its first session ticket
    // (which it sends once it has) or its alert, so that a refusal is the
    // handshake's error, not the migration's first read's.
    if let Connection::Client(c) = &mut tls
        && c.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
    {
        while c.tls13_tickets_received() == 0 {
            c.complete_io(&mut t).map_err(|e| e.to_string())?;
        }
    }
    // The pump reads plain bytes only once the last ones are out, so the
    // buffer holds one read at most.
    tls.set_buffer_limit(None);
    tcp.set_read_timeout(None).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(None).map_err(|e| e.to_string())?;
    Ok(tls)
}

/// A connected pair of loopback sockets.
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// Bytes the pump reads from one side at a time.
const PUMP_CHUNK: usize = 256 << 10;

/// Moves bytes between `plain` and `tcp` through `tls` until both
/// directions ended ([`Pump`]). A record that fails its authentication (a
/// byte changed on the way) ends it with the reason; both sockets are
/// shut, so the migration sees its connection end.
fn pump(tls: Connection, tcp: TcpStream, plain: TcpStream) -> Result<(), String> {
    let mut p = Pump {
        tls,
        tcp,
        plain,
        buf: vec![0u8; PUMP_CHUNK],
        out: Vec::new(),
        plain_eof: false,
        tcp_eof: false,
    };
    let r = p.run();
    if r.is_err() {
        let _ = p.tcp.shutdown(Shutdown::Both);
        let _ = p.plain.shutdown(Shutdown::Both);
    }
    r
}

/// One connection's pump: one thread, `poll` on both sockets.
/// Backpressure: it reads plain bytes only when the last ones are out on
/// the network, and network bytes only when the last plain ones were
/// delivered.
struct Pump {
    tls: Connection,
    tcp: TcpStream,
    plain: TcpStream,
    buf: Vec<u8>,
    /// Plain bytes decrypted, not yet delivered.
    out: Vec<u8>,
    plain_eof: bool,
    tcp_eof: bool,
}

/// A socket error, unless it only says "not now".
fn hard(e: io::Error) -> Result<(), String> {
    if e.kind() == io::ErrorKind::WouldBlock { Ok(()) } else { Err(e.to_string()) }
}

impl Pump {
    fn run(&mut self) -> Result<(), String> {
        for s in [&self.tcp, &self.plain] {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
        }
        loop {
            let read_plain = !self.plain_eof && !self.tls.wants_write();
            let read_tcp = !self.tcp_eof && self.out.is_empty();
            if self.plain_eof && self.tcp_eof && self.out.is_empty() && !self.tls.wants_write() {
                return Ok(());
            }
            let (plain_ready, tcp_ready) = self.wait(read_plain, read_tcp)?;
            if read_plain && plain_ready {
                self.encrypt()?;
            }
            self.flush_network()?;
            if read_tcp && tcp_ready {
                self.decrypt()?;
            }
            self.deliver()?;
        }
    }

    /// Polls both sockets for what this round can do (a second at most);
    /// returns which are ready.
    fn wait(&self, read_plain: bool, read_tcp: bool) -> Result<(bool, bool), String> {
        let ev = |on: bool, e: libc::c_short| if on { e } else { 0 };
        let mut fds = [
            libc::pollfd {
                fd: self.plain.as_raw_fd(),
                events: ev(read_plain, libc::POLLIN) | ev(!self.out.is_empty(), libc::POLLOUT),
                revents: 0,
            },
            libc::pollfd {
                fd: self.tcp.as_raw_fd(),
                events: ev(read_tcp, libc::POLLIN) | ev(self.tls.wants_write(), libc::POLLOUT),
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call's
        // duration, and its length is the count given.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok((false, false))
            } else {
                Err(e.to_string())
            };
        }
        Ok((fds[0].revents != 0, fds[1].revents != 0))
    }

    /// Plain bytes into TLS records (at its end, `close_notify`).
    fn encrypt(&mut self) -> Result<(), String> {
        match (&self.plain).read(&mut self.buf) {
            Ok(0) => {
                self.plain_eof = true;
                self.tls.send_close_notify();
                Ok(())
            }
            Ok(n) => self.tls.writer().write_all(&self.buf[..n]).map_err(|e| e.to_string()),
            Err(e) => hard(e),
        }
    }

    /// TLS records out on the network, as far as it takes them.
    fn flush_network(&mut self) -> Result<(), String> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut &self.tcp) {
                Ok(_) => {}
                Err(e) => return hard(e),
            }
        }
        if self.plain_eof && !self.tls.wants_write() {
            let _ = self.tcp.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Records from the network, checked and decrypted into `out`.
    fn decrypt(&mut self) -> Result<(), String> {
        match self.tls.read_tls(&mut &self.tcp) {
            Ok(0) => self.tcp_eof = true,
            Ok(_) => {
                if let Err(e) = self.tls.process_new_packets() {
                    // The alert for the peer, then the end.
                    let _ = self.tls.write_tls(&mut &self.tcp);
                    return Err(format!("the peer's data failed TLS: {e}"));
                }
                loop {
                    match self.tls.reader().read(&mut self.buf) {
                        Ok(0) => {
                            self.tcp_eof = true;
                            break;
                        }
                        Ok(n) => self.out.extend_from_slice(&self.buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
            Err(e) => return hard(e),
        }
        Ok(())
    }

    /// Decrypted bytes to the plain side, as far as it takes them (at the
    /// network's end, the plain side's).
    fn deliver(&mut self) -> Result<(), String> {
        if !self.out.is_empty() {
            match (&self.plain).write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) => hard(e)?,
            }
        }
        if self.tcp_eof && self.out.is_empty() {
            let _ = self.plain.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}
