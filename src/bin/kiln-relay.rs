//! `kiln-relay`: WireGuard's UDP over one TCP connection (see
//! `kiln::deliver::relay`). Installed in node images that reach their hub
//! over TCP, and in the bundle `kiln hub` writes. Its arguments are read
//! by hand: it uses std only, so the binary stays small.

use std::net::SocketAddr;

// The module itself, not the kiln library: the binary links std alone.
#[path = "../deliver/relay.rs"]
mod relay;

const USAGE: &str = "\
kiln-relay: WireGuard's UDP carried over TCP, for networks that drop UDP

usage:
  kiln-relay client --udp ADDR:PORT --tcp HOST:PORT
      on a node: take WireGuard's datagrams on the local UDP address (the
      hub's endpoint in the WireGuard config) and carry them to the hub's
      relay over TCP, dialling again when the connection drops
  kiln-relay server --tcp ADDR:PORT --udp ADDR:PORT
      on the hub: accept nodes' connections on the TCP address and give
      each a UDP socket of its own towards the hub's WireGuard port
  kiln-relay --version";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("kiln-relay: {e}\n\n{USAGE}");
        std::process::exit(2);
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mode = args.first().map(String::as_str);
    if matches!(mode, Some("--help" | "-h")) {
        println!("{USAGE}");
        return Ok(());
    }
    if mode == Some("--version") {
        println!("kiln-relay {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let (mut udp, mut tcp) = (None, None);
    let mut rest = args.iter().skip(1);
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--udp" => udp = Some(value.clone()),
            "--tcp" => tcp = Some(value.clone()),
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    let udp = udp.ok_or("--udp is missing")?;
    let tcp = tcp.ok_or("--tcp is missing")?;
    let addr = |s: &str| s.parse::<SocketAddr>().map_err(|e| format!("`{s}`: {e}"));
    let r = match mode {
        Some("client") => relay::run_client(addr(&udp)?, &tcp),
        Some("server") => relay::run_server(addr(&tcp)?, addr(&udp)?),
        _ => return Err("say `client` or `server` first".into()),
    };
    r.map_err(|e| e.to_string())
}
