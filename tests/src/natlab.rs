//! A NAT lab: an "internet" and home networks behind real Linux NATs, in network namespaces.
//!
//! ```text
//!   namespace <lab>-inet: bridge br0, 203.0.113.0/24 (TEST-NET-3); super peers on .11, .12, ...
//!      ├── p1 ── <lab>-r1 (router, wan 203.0.113.101, NAT kind 1) ── lan 10.1.0.1 ── <lab>-h1 (10.1.0.2)
//!      ├── p2 ── <lab>-c2 (carrier-grade NAT, wan .102) ── 100.64.2.0/24 ── <lab>-r2 (home NAT) ── <lab>-h2
//!      └── p3 ── <lab>-h3 (public host, 203.0.113.103)
//! ```
//!
//! Each router is a namespace with IP forwarding and iptables (nf_tables backend) rules for its kind:
//!
//! | kind                 | mapping                     | filtering (who may send in)                    |
//! |----------------------|-----------------------------|------------------------------------------------|
//! | `easy`               | endpoint-independent (MASQUERADE keeps the port) | only the exact addr:port contacted |
//! | `full-cone`          | endpoint-independent        | anyone (inbound UDP is DNATed to the host)     |
//! | `address-restricted` | endpoint-independent        | any port of an IP the host contacted (xt_recent) |
//! | `symmetric`          | endpoint-dependent (`MASQUERADE --random-fully`) | only the exact addr:port contacted |
//! | `double`             | two `easy` NATs in a row (CGN, then home) | as `easy`, twice                  |
//! | `public`             | none (the host has a public address) | anyone                                |
//!
//! Routers drop unsolicited inbound packets in the filter table (INPUT and FORWARD policy DROP), as home
//! routers do. A dropped packet's conntrack entry is never confirmed, so an early punch packet from a peer does
//! not reserve the port the inside host is about to be mapped to.
//!
//! Every namespace name starts with `vl<pid>-`; dropping the [`Lab`] deletes them (also when a test panics),
//! and a new lab first removes those left by processes that no longer exist. All addresses live inside these
//! namespaces. Needs root, `ip` (iproute2) and `iptables`.

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

/// The kinds of network a lab host can sit behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    Public,
    Easy,
    FullCone,
    AddressRestricted,
    Symmetric,
    Double,
}

impl NatKind {
    /// Every kind, in the order of the docs' matrix.
    pub const ALL: [NatKind; 6] = [
        NatKind::Public,
        NatKind::FullCone,
        NatKind::AddressRestricted,
        NatKind::Easy,
        NatKind::Double,
        NatKind::Symmetric,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::Easy => "easy",
            NatKind::FullCone => "full-cone",
            NatKind::AddressRestricted => "address-restricted",
            NatKind::Symmetric => "symmetric",
            NatKind::Double => "double",
        }
    }

    /// The NAT class a leaf behind this kind should measure.
    pub fn expected_class(self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::Symmetric => "endpoint-dependent",
            _ => "endpoint-independent",
        }
    }
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A host of the lab.
#[derive(Debug, Clone)]
pub struct LabHost {
    pub kind: NatKind,
    /// Namespace the host's programs run in.
    pub ns: String,
    /// The host's own address.
    pub ip: Ipv4Addr,
    /// The address the internet sees (the outermost router's WAN address, or `ip` for a public host).
    pub public_ip: Ipv4Addr,
    /// The namespace facing the internet (the outermost router, or the host itself when public) and its
    /// interface there: where [`Lab::delay`] holds packets.
    pub edge: (String, String),
}

/// The lab: namespaces, links and rules, removed on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    hosts: u8,
    super_peers: u8,
}

/// First address of the super peers on the internet segment (203.0.113.11, .12, ...).
const SUPER_PEER_BASE: u8 = 11;
/// Public addresses of hosts and routers: 203.0.113.101, .102, ...
const HOST_BASE: u8 = 100;

use crate::run_system as run;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(drop)
}

/// Runs `program args` inside namespace `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all).map(drop)
}

fn iptables(ns: &str, rule: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = rule.split_whitespace().collect();
    in_ns(ns, "iptables", &args)
}

/// Deletes lab namespaces whose creating process is gone (a test killed before its cleanup ran).
fn remove_stale_namespaces() {
    let Ok(listing) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in listing.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("vl") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if let Ok(pid) = pid.parse::<u32>() {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
}

/// Moves the calling thread into the network namespace `file` (opened from `/run/netns/NAME`).
fn enter_network_namespace(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(std::io::Error::from)
}

impl Lab {
    /// Builds the internet segment with `super_peers` addresses for super peers.
    pub fn new(super_peers: u8) -> anyhow::Result<Lab> {
        if !rustix::process::geteuid().is_root() {
            bail!("the NAT lab needs root (network namespaces and iptables)");
        }
        remove_stale_namespaces();
        let mut lab = Lab {
            prefix: format!("vl{}", std::process::id()),
            namespaces: Vec::new(),
            hosts: 0,
            super_peers,
        };
        let inet = lab.add_namespace("inet")?;
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &inet, "link", "set", "br0", "up"])?;
        for index in 0..super_peers {
            let addr = format!("{}/24", lab.super_peer_ip(index));
            ip(&["-n", &inet, "addr", "add", &addr, "dev", "br0"])?;
        }
        Ok(lab)
    }

    /// Name of the internet namespace (where super peers run).
    pub fn inet(&self) -> String {
        format!("{}-inet", self.prefix)
    }

    /// Address of super peer `index` (0-based) on the internet segment.
    pub fn super_peer_ip(&self, index: u8) -> Ipv4Addr {
        assert!(
            index < self.super_peers,
            "the lab has {} super peer addresses",
            self.super_peers
        );
        Ipv4Addr::new(203, 0, 113, SUPER_PEER_BASE + index)
    }

    fn add_namespace(&mut self, name: &str) -> anyhow::Result<String> {
        let full = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &full])?;
        self.namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        Ok(full)
    }

    /// Links namespace `ns` (interface `name`) to the internet bridge with address `addr`.
    fn plug_into_internet(
        &self,
        ns: &str,
        name: &str,
        port: &str,
        addr: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let inet = self.inet();
        ip(&[
            "link", "add", name, "netns", ns, "type", "veth", "peer", "name", port, "netns", &inet,
        ])?;
        ip(&["-n", &inet, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &inet, "link", "set", port, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", name])?;
        ip(&["-n", ns, "link", "set", name, "up"])?;
        Ok(())
    }

    /// Links `inside` (interface eth0, address `inside_ip`) to `router` (interface `lan`, `router_ip`) on a /24,
    /// with the router as the inside namespace's default gateway.
    fn plug_behind(
        &self,
        router: &str,
        inside: &str,
        inside_if: &str,
        router_ip: Ipv4Addr,
        inside_ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        ip(&[
            "link", "add", "lan", "netns", router, "type", "veth", "peer", "name", inside_if,
            "netns", inside,
        ])?;
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            &format!("{router_ip}/24"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", router, "link", "set", "lan", "up"])?;
        ip(&[
            "-n",
            inside,
            "addr",
            "add",
            &format!("{inside_ip}/24"),
            "dev",
            inside_if,
        ])?;
        ip(&["-n", inside, "link", "set", inside_if, "up"])?;
        ip(&[
            "-n",
            inside,
            "route",
            "add",
            "default",
            "via",
            &router_ip.to_string(),
        ])?;
        Ok(())
    }

    /// Turns `router` into a NAT of `kind` between `wan` and `lan`, for the single inside host `host`.
    fn configure_router(
        &self,
        router: &str,
        wan: &str,
        kind: NatKind,
        host: Ipv4Addr,
    ) -> anyhow::Result<()> {
        in_ns(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // Unsolicited inbound traffic is dropped, before its conntrack entry is confirmed.
        for rule in [
            "-P INPUT DROP".to_string(),
            "-A INPUT -i lo -j ACCEPT".to_string(),
            "-A INPUT -i lan -j ACCEPT".to_string(),
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_string(),
            "-P FORWARD DROP".to_string(),
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_string(),
        ] {
            iptables(router, &rule)?;
        }
        match kind {
            NatKind::Easy | NatKind::Double => {
                iptables(
                    router,
                    &format!("-t nat -A POSTROUTING -o {wan} -j MASQUERADE"),
                )?;
            }
            NatKind::Symmetric => {
                iptables(
                    router,
                    &format!("-t nat -A POSTROUTING -o {wan} -j MASQUERADE --random-fully"),
                )?;
            }
            NatKind::FullCone => {
                iptables(
                    router,
                    &format!("-t nat -A POSTROUTING -o {wan} -j MASQUERADE"),
                )?;
                iptables(
                    router,
                    &format!(
                        "-t nat -A PREROUTING -i {wan} -p udp -j DNAT --to-destination {host}"
                    ),
                )?;
                iptables(
                    router,
                    &format!("-A FORWARD -i {wan} -o lan -m conntrack --ctstate DNAT -j ACCEPT"),
                )?;
            }
            NatKind::AddressRestricted => {
                iptables(
                    router,
                    &format!("-t nat -A POSTROUTING -o {wan} -j MASQUERADE"),
                )?;
                // Remember every IP the host sent to; inbound UDP from such an IP (any port) is let in.
                iptables(
                    router,
                    &format!("-A FORWARD -i lan -o {wan} -m recent --name contacted --rdest --set"),
                )?;
                iptables(
                    router,
                    &format!(
                        "-t nat -A PREROUTING -i {wan} -p udp -m recent --name contacted --rsource --rcheck --seconds 600 -j DNAT --to-destination {host}"
                    ),
                )?;
                iptables(
                    router,
                    &format!("-A FORWARD -i {wan} -o lan -m conntrack --ctstate DNAT -j ACCEPT"),
                )?;
            }
            NatKind::Public => unreachable!("a public host has no router"),
        }
        iptables(router, &format!("-A FORWARD -i lan -o {wan} -j ACCEPT"))?;
        Ok(())
    }

    /// Adds a host behind a network of `kind`.
    pub fn add_host(&mut self, kind: NatKind) -> anyhow::Result<LabHost> {
        self.hosts += 1;
        let index = self.hosts;
        let public_ip = Ipv4Addr::new(203, 0, 113, HOST_BASE + index);
        let port = format!("p{index}");
        let host = self.add_namespace(&format!("h{index}"))?;
        let inside_ip = Ipv4Addr::new(10, index, 0, 2);
        let edge = match kind {
            NatKind::Public => {
                self.plug_into_internet(&host, "eth0", &port, public_ip)?;
                return Ok(LabHost {
                    kind,
                    edge: (host.clone(), "eth0".into()),
                    ns: host,
                    ip: public_ip,
                    public_ip,
                });
            }
            NatKind::Double => {
                let cgn = self.add_namespace(&format!("c{index}"))?;
                let router = self.add_namespace(&format!("r{index}"))?;
                self.plug_into_internet(&cgn, "wan", &port, public_ip)?;
                let (cgn_lan, home_wan) = (
                    Ipv4Addr::new(100, 64, index, 1),
                    Ipv4Addr::new(100, 64, index, 2),
                );
                self.plug_behind(&cgn, &router, "wan", cgn_lan, home_wan)?;
                self.plug_behind(
                    &router,
                    &host,
                    "eth0",
                    Ipv4Addr::new(10, index, 0, 1),
                    inside_ip,
                )?;
                self.configure_router(&cgn, "wan", NatKind::Easy, home_wan)?;
                self.configure_router(&router, "wan", NatKind::Easy, inside_ip)?;
                cgn
            }
            _ => {
                let router = self.add_namespace(&format!("r{index}"))?;
                self.plug_into_internet(&router, "wan", &port, public_ip)?;
                self.plug_behind(
                    &router,
                    &host,
                    "eth0",
                    Ipv4Addr::new(10, index, 0, 1),
                    inside_ip,
                )?;
                self.configure_router(&router, "wan", kind, inside_ip)?;
                router
            }
        };
        Ok(LabHost {
            kind,
            edge: (edge, "wan".into()),
            ns: host,
            ip: inside_ip,
            public_ip,
        })
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.arg("netns").arg("exec").arg(ns).arg(program);
        command
    }

    /// Runs `future` on a runtime whose threads live in namespace `ns`, and returns its output.
    pub fn run_in<F, T>(&self, ns: &str, future: F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let ns = ns.to_string();
        let file = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("namespace {ns} does not exist"))?;
        std::thread::spawn(move || -> anyhow::Result<T> {
            enter_network_namespace(&file).with_context(|| format!("setns into {ns}"))?;
            // Worker threads are created by this thread, so they inherit its namespace.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(future)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// Packets held by [`Lab::delay`]; dropping it lets every held packet go and stops the delay.
pub struct Delay {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Lab {
    /// Delays every packet that comes into `host`'s edge from the internet by `inbound`: two delayed hosts then
    /// see `2 * inbound` of extra round trip between them, and each sees `inbound` to the super peers. This
    /// kernel has no netem, so it is NFQUEUE in the raw table's PREROUTING (before conntrack looks at the
    /// packet, as if it were still on the wire) and a thread that holds each packet for its time before
    /// accepting it; packets keep their order and none is dropped. Only the inbound side is delayed, because a
    /// hold on the way out would sit between a NAT's mapping and its confirmation, which no real link does.
    pub fn delay(&self, host: &LabHost, inbound: Duration) -> anyhow::Result<Delay> {
        let (ns, interface) = host.edge.clone();
        let queue_num: u16 = 7;
        let file = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("namespace {ns} does not exist"))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread_ns = ns.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let ns = thread_ns;
            enter_network_namespace(&file).with_context(|| format!("setns into {ns}"))?;
            let mut queue = nfq::Queue::open().context("open NFQUEUE")?;
            queue.bind(queue_num).context("bind NFQUEUE")?;
            queue.set_queue_max_len(queue_num, 65536)?;
            queue.set_nonblocking(true);
            let _ = ready_tx.send(());
            let mut held: std::collections::VecDeque<(std::time::Instant, nfq::Message)> =
                std::collections::VecDeque::new();
            loop {
                let stopped = stopping.load(std::sync::atomic::Ordering::Relaxed);
                loop {
                    match queue.recv() {
                        Ok(message) => {
                            held.push_back((std::time::Instant::now() + inbound, message))
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(error) => return Err(error).context("NFQUEUE receive"),
                    }
                }
                let now = std::time::Instant::now();
                while held.front().is_some_and(|(due, _)| stopped || *due <= now) {
                    let (_, mut message) = held.pop_front().expect("front exists");
                    message.set_verdict(nfq::Verdict::Accept);
                    queue.verdict(message)?;
                }
                if stopped {
                    return Ok(());
                }
                let next = held
                    .front()
                    .map(|(due, _)| due.saturating_duration_since(now))
                    .unwrap_or(Duration::from_millis(1));
                std::thread::sleep(next.min(Duration::from_micros(200)));
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the delay thread did not bind its queue")?;
        // --queue-bypass lets packets pass undelayed should the thread be gone.
        iptables(
            &ns,
            &format!(
                "-t raw -A PREROUTING -i {interface} -j NFQUEUE --queue-num {queue_num} --queue-bypass"
            ),
        )?;
        Ok(Delay {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace removes its interfaces, veth peers included, and its rules.
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}
