//! `kiln-relay`: WireGuard's UDP carried over one TCP connection, for a
//! node whose network drops UDP (a campus firewall that lets out TCP 443
//! only). The node runs a client: WireGuard's hub endpoint is the client's
//! local UDP port, and each datagram goes to the hub over TCP. The hub
//! runs a server: each TCP connection gets a UDP socket of its own towards
//! the hub's WireGuard port, so WireGuard sees every node as a distinct
//! endpoint and answers each through its own connection.
//!
//! On the wire each datagram is a 16-bit big-endian length and the bytes:
//! the format of Debian's `udptunnel` and of Mullvad's `udp-over-tcp`, so
//! a hub may run Mullvad's `tcp2udp` instead of this server.
//!
//! Why kiln carries its own (about 200 lines, std only) rather than one of
//! those tools:
//! - `udptunnel` (Debian) binds its UDP port for both receiving and
//!   sending and serves one TCP connection: it cannot sit beside
//!   WireGuard on the hub's port, nor serve more than one node.
//! - `udp-over-tcp` on the crate registry (jonhoo) relays one connection
//!   at a time on its listening side: one node per hub port.
//! - `phantun` (fake TCP) needs a TUN device and NAT rules on both ends,
//!   and its segments are not a real TCP stream: a firewall that proxies
//!   or normalises TCP 443 drops them.
//! - Mullvad's `udp-over-tcp` fits (its `tcp2udp` serves many clients),
//!   but it is not published to the crate registry and its release
//!   binaries cannot be fetched by this build; it stays a drop-in for the
//!   hub side.
//!
//! WireGuard authenticates every packet, so the relay adds no trust: a
//! stranger who connects reaches only WireGuard's port, as over UDP.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The largest datagram a frame carries (the length field's range).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;
/// How often a blocked UDP read wakes to see whether its connection ended.
const POLL: Duration = Duration::from_millis(500);
/// A connection from which nothing arrived for this long is dropped and
/// dialled again. A node behind NAT sends a keepalive every 25 s, and
/// WireGuard renews its session every 2 minutes, so a live hub always
/// answers within this.
pub const IDLE_LIMIT: Duration = Duration::from_secs(180);
/// Connections a server serves at once (a small cluster has tens).
pub const MAX_CONNECTIONS: usize = 1024;

/// Frame `payload` as it goes on the TCP stream.
pub fn frame(payload: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(payload.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a {}-byte datagram does not fit a frame", payload.len()),
        )
    })?;
    let mut out = Vec::with_capacity(payload.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Read one frame into `buf`; `Ok(None)` at a clean end of stream.
pub fn read_frame<'b>(r: &mut impl Read, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = usize::from(u16::from_be_bytes(len));
    r.read_exact(&mut buf[..len])?;
    Ok(Some(&buf[..len]))
}

/// Carry frames from `tcp` to `send` until the stream ends, fails or
/// stays silent for [`IDLE_LIMIT`]; then set `done`.
fn tcp_to_udp(mut tcp: TcpStream, done: &AtomicBool, send: impl Fn(&[u8]) -> io::Result<()>) {
    let _ = tcp.set_read_timeout(Some(IDLE_LIMIT));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(Some(d)) = read_frame(&mut tcp, &mut buf) {
        // A datagram the local side refuses (WireGuard restarting) is
        // dropped, as the network would.
        let _ = send(d);
    }
    done.store(true, Ordering::SeqCst);
    let _ = tcp.shutdown(Shutdown::Both);
}

/// Carry datagrams from `udp` to `tcp` until `done` or a write fails;
/// `accept` says whether a datagram's source may use this connection.
fn udp_to_tcp(
    udp: &UdpSocket,
    mut tcp: TcpStream,
    done: &AtomicBool,
    mut accept: impl FnMut(SocketAddr) -> bool,
) {
    let _ = udp.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !done.load(Ordering::SeqCst) {
        let (n, from) = match udp.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        if !accept(from) {
            continue;
        }
        if frame(&buf[..n]).and_then(|f| tcp.write_all(&f)).is_err() {
            break;
        }
    }
    done.store(true, Ordering::SeqCst);
    let _ = tcp.shutdown(Shutdown::Both);
}

/// WireGuard's local address, as last seen by the client: kept across
/// connections, so the hub's packets after a reconnect reach WireGuard
/// before it sends again.
type LastSource = Arc<std::sync::Mutex<Option<SocketAddr>>>;

/// Relay `udp` over `tcp` in both directions until either side ends.
/// Datagrams go back to the last local source seen (WireGuard's port).
fn relay_client_connection(
    udp: &UdpSocket,
    tcp: TcpStream,
    last_source: &LastSource,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (tcp, done, udp, last) = (
            tcp.try_clone()?,
            done.clone(),
            udp.try_clone()?,
            last_source.clone(),
        );
        std::thread::spawn(move || {
            tcp_to_udp(tcp, &done, |d| match *last.lock().unwrap() {
                Some(to) => udp.send_to(d, to).map(drop),
                None => Ok(()),
            })
        })
    };
    udp_to_tcp(udp, tcp, &done, |from| {
        *last_source.lock().unwrap() = Some(from);
        true
    });
    let _ = reader.join();
    Ok(())
}

/// The node's side: receive WireGuard's datagrams on `listen` and carry
/// them to the server at `server` (a `host:port`, resolved at each dial),
/// dialling again after a failure with a growing pause (at most 30 s).
/// Runs until the process is stopped.
pub fn run_client(listen: SocketAddr, server: &str) -> io::Result<()> {
    let udp = UdpSocket::bind(listen)?;
    eprintln!("kiln-relay: carrying UDP {listen} to TCP {server}");
    let mut pause = Duration::from_secs(1);
    let last_source = LastSource::default();
    loop {
        match dial(server) {
            Ok(tcp) => {
                eprintln!("kiln-relay: connected to {server}");
                pause = Duration::from_secs(1);
                relay_client_connection(&udp, tcp, &last_source)?;
                eprintln!("kiln-relay: connection to {server} ended; dialling again");
            }
            Err(e) => {
                eprintln!(
                    "kiln-relay: cannot reach {server}: {e}; trying again in {} s",
                    pause.as_secs()
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn dial(server: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for a in server.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The hub's side: accept connections on `listen`; each gets a UDP socket
/// of its own connected to `forward` (the hub's WireGuard port).
pub fn run_server(listen: SocketAddr, forward: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    eprintln!("kiln-relay: serving TCP {listen} for UDP {forward}");
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let peer = tcp.peer_addr().map_or("?".into(), |a| a.to_string());
        if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            eprintln!("kiln-relay: refusing {peer}: {MAX_CONNECTIONS} connections already");
            continue;
        }
        live.fetch_add(1, Ordering::SeqCst);
        eprintln!("kiln-relay: {peer} connected");
        let live = live.clone();
        let log_line = format!("kiln-relay: {peer} disconnected");
        std::thread::spawn(move || {
            let r = serve_connection(tcp, forward);
            live.fetch_sub(1, Ordering::SeqCst);
            eprintln!(
                "{log_line}{}",
                r.err().map_or(String::new(), |e| format!(": {e}"))
            );
        });
    }
    Ok(())
}

fn serve_connection(tcp: TcpStream, forward: SocketAddr) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let bind: SocketAddr = if forward.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let udp = UdpSocket::bind(bind)?;
    udp.connect(forward)?;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (tcp, done, udp) = (tcp.try_clone()?, done.clone(), udp.try_clone()?);
        std::thread::spawn(move || tcp_to_udp(tcp, &done, |d| udp.send(d).map(drop)))
    };
    // A connected socket receives only from `forward`.
    udp_to_tcp(&udp, tcp, &done, |_| true);
    let _ = reader.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_the_length_then_the_bytes() {
        assert_eq!(frame(b"abc").unwrap(), vec![0, 3, b'a', b'b', b'c']);
        assert_eq!(frame(&[]).unwrap(), vec![0, 0]);
        assert!(frame(&vec![0; MAX_DATAGRAM + 1]).is_err());
    }

    #[test]
    fn frames_read_back_one_datagram_each_and_end_cleanly() {
        let mut stream = Vec::new();
        for d in [&b"one"[..], b"", &[7u8; 1500]] {
            stream.extend(frame(d).unwrap());
        }
        let mut r = &stream[..];
        let mut buf = vec![0; MAX_DATAGRAM];
        assert_eq!(read_frame(&mut r, &mut buf).unwrap().unwrap(), b"one");
        assert_eq!(read_frame(&mut r, &mut buf).unwrap().unwrap(), b"");
        assert_eq!(
            read_frame(&mut r, &mut buf).unwrap().unwrap(),
            &[7u8; 1500][..]
        );
        assert!(read_frame(&mut r, &mut buf).unwrap().is_none());
        // A frame cut short is an error, not a short datagram.
        let mut cut = &[0u8, 5, 1, 2][..];
        assert!(read_frame(&mut cut, &mut buf).is_err());
    }

    /// Two clients through one server to a UDP echo: each gets its own
    /// answers back, with datagram boundaries kept.
    #[test]
    fn a_server_serves_two_clients_each_with_its_own_socket() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let mut reply = from.port().to_be_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = echo.send_to(&reply, from);
            }
        });
        let tcp_port = free_tcp_port();
        let listen: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().unwrap();
        std::thread::spawn(move || run_server(listen, echo_addr));
        let mut sources = Vec::new();
        for i in 0..2u8 {
            let local: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
            let server = listen.to_string();
            std::thread::spawn(move || run_client(local, &server));
            let wg = UdpSocket::bind("127.0.0.1:0").unwrap();
            wg.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 2048];
            // The client dials once it runs: resend until an answer comes.
            let got = (0..100).find_map(|_| {
                wg.send_to(&[i; 1400], local).unwrap();
                wg.recv_from(&mut buf).ok()
            });
            let (n, from) = got.expect("an answer through the relay within 20 s");
            assert_eq!(from, local, "answers come from the client's port");
            assert_eq!(n, 1402);
            assert!(
                buf[2..n].iter().all(|&b| b == i),
                "client {i} got its own datagram back"
            );
            sources.push(u16::from_be_bytes([buf[0], buf[1]]));
        }
        assert_ne!(
            sources[0], sources[1],
            "each connection has its own UDP socket on the server"
        );
    }

    fn free_tcp_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn free_udp_port() -> u16 {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
