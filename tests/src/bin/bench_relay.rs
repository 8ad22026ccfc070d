//! `vesper-bench-relay`: UDP datagrams between two sockets A and B on loopback, over three paths side by side
//! in one run.
//!
//! 1. direct: A and B send to each other's address.
//! 2. vesper relay: a real `superpeer` process relays. The benchmark gets a token from the node's
//!    `Cluster.GrantRelay` (with the test PKI's super peer certificate), binds A and then B to the allocation on
//!    the node's UDP relay/STUN port, and from then on each side sends plain datagrams to that port.
//! 3. coturn: Debian's `turnserver` relays. A is a TURN client (Allocate, CreatePermission and ChannelBind for
//!    B, then ChannelData both ways); B is a plain UDP socket sending to A's relayed address.
//!
//! Each path gets the same two measurements:
//!
//! - round trip: A sends a ping, B echoes it, A waits (one at a time, with a timeout per ping), in blocks of
//!   100 with the paths taking turns;
//! - throughput: A keeps at most `--window` unacknowledged datagrams in flight; B acknowledges every
//!   `--ack-every` datagrams with the highest sequence number it has seen, through the same path; when no
//!   acknowledgement comes within `--ack-timeout-ms`, A counts a stall and treats the window as lost. The
//!   paths run this one after the other; the relay's CPU time and the kernel's receive-buffer drops at every
//!   socket involved are read around it.
//!
//! The super peer runs with its per-allocation relay caps (bytes, bytes per second, seconds) lifted, so that
//! the path is measured, not the policy. Build in release mode first:
//! `cargo build --release -p vesper-superpeer -p vesper-ops --bins && cargo build --release -p vesper-tests
//! --bin vesper-bench-relay && $CARGO_TARGET_DIR/release/vesper-bench-relay`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::relay;

/// Benchmark UDP relaying: direct vs the Vesper super peer's relay vs coturn.
#[derive(Debug, Parser)]
struct Args {
    /// Measured round trips per path (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Round trips before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Payload bytes per datagram (what B receives; coturn's ChannelData header comes on top on A's leg).
    #[arg(long, default_value_t = 1200)]
    payload_bytes: usize,
    /// Seconds of windowed sending per path.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Unacknowledged datagrams A keeps in flight at most.
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// B acknowledges every this many datagrams.
    #[arg(long, default_value_t = 16)]
    ack_every: u64,
    /// Milliseconds A waits for an acknowledgement before it treats the window as lost.
    #[arg(long, default_value_t = 50)]
    ack_timeout_ms: u64,
    /// Milliseconds a ping waits for its echo before it counts as a timeout.
    #[arg(long, default_value_t = 1000)]
    ping_timeout_ms: u64,
    /// Print every block's round-trip median (µs), path by path, in the order the blocks ran.
    #[arg(long)]
    show_blocks: bool,
    /// The coturn binary.
    #[arg(long, default_value = "/usr/bin/turnserver")]
    turnserver: PathBuf,
}

// --- datagrams of the benchmark ---------------------------------------------------------------------------

/// First byte of a ping (echoed by B), of a data datagram (counted by B) and of an acknowledgement (from B).
const PING: u8 = 1;
const DATA: u8 = 2;
const ACK: u8 = 3;

fn put_seq(buffer: &mut [u8], kind: u8, seq: u64) {
    buffer[0] = kind;
    buffer[1..9].copy_from_slice(&seq.to_le_bytes());
}

fn seq_of(datagram: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(datagram.get(1..9)?.try_into().ok()?))
}

/// Socket buffers of A and B (both directions); the kernel caps them at `net.core.{r,w}mem_max`.
const ENDPOINT_BUFFER_BYTES: usize = 4 << 20;

fn bind_endpoint() -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let options = socket2::SockRef::from(&socket);
    options
        .set_recv_buffer_size(ENDPOINT_BUFFER_BYTES)
        .context("SO_RCVBUF")?;
    options
        .set_send_buffer_size(ENDPOINT_BUFFER_BYTES)
        .context("SO_SNDBUF")?;
    Ok(socket)
}

use vesper_tests::relay::timed_out;

/// Datagrams the kernel dropped on arrival (receive buffer full) at the IPv4 UDP sockets bound to any of
/// `ports`, from the `drops` column of /proc/net/udp.
fn udp_drops(ports: &[u16]) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp")?;
    let mut drops = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(dropped)) = (fields.get(1), fields.last()) else {
            continue;
        };
        let port = local
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
        if port.is_some_and(|port| ports.contains(&port)) {
            drops += dropped.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(drops)
}

// --- side A: the only side that differs between paths ---------------------------------------------------

/// How A's datagrams are wrapped on the way to the relay and unwrapped on the way back.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// As they are (direct, and Vesper's relay).
    Plain,
    /// TURN ChannelData on this channel number.
    Channel(u16),
}

struct SideA {
    socket: UdpSocket,
    /// Where A sends: B itself, or the relay.
    to: SocketAddr,
    framing: Framing,
    out: Vec<u8>,
}

impl SideA {
    fn send(&mut self, payload: &[u8]) -> std::io::Result<()> {
        match self.framing {
            Framing::Plain => self.socket.send_to(payload, self.to).map(drop),
            Framing::Channel(channel) => {
                self.out.clear();
                self.out.extend_from_slice(&channel.to_be_bytes());
                self.out
                    .extend_from_slice(&(payload.len() as u16).to_be_bytes());
                self.out.extend_from_slice(payload);
                self.socket.send_to(&self.out, self.to).map(drop)
            }
        }
    }

    /// Receives one datagram; `Ok(None)` when it is not a payload from the path (other source, or a TURN
    /// message that is not ChannelData of our channel).
    fn recv<'b>(&self, buffer: &'b mut [u8]) -> std::io::Result<Option<&'b [u8]>> {
        let (len, from) = self.socket.recv_from(buffer)?;
        if from != self.to {
            return Ok(None);
        }
        let datagram = &buffer[..len];
        Ok(match self.framing {
            Framing::Plain => Some(datagram),
            Framing::Channel(channel) => {
                if len < 4 || u16::from_be_bytes([datagram[0], datagram[1]]) != channel {
                    return Ok(None);
                }
                let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
                // Over UDP the padding to 4 bytes is optional; whatever follows the length is ignored.
                datagram.get(4..4 + length)
            }
        })
    }
}

// --- side B: plain UDP on every path ---------------------------------------------------------------------

/// What B counted; written by B's thread only.
#[derive(Default)]
struct Counters {
    data: AtomicU64,
}

/// Runs B on its own thread until `stop` (checked whenever no datagram came for 100 ms): echoes pings,
/// counts data datagrams and acknowledges every `ack_every` of them with the highest sequence number seen.
fn spawn_b(
    socket: UdpSocket,
    to: SocketAddr,
    ack_every: u64,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        let mut ack = [0u8; 9];
        let (mut highest, mut since_ack) = (0u64, 0u64);
        loop {
            let (len, from) = match socket.recv_from(&mut buffer) {
                Ok(received) => received,
                Err(error) if timed_out(&error) => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    continue;
                }
                Err(error) => return Err(error).context("B receives"),
            };
            if from != to || len < 9 {
                continue;
            }
            let datagram = &buffer[..len];
            match datagram[0] {
                PING => {
                    socket.send_to(datagram, to).context("B echoes")?;
                }
                DATA => {
                    let seq = seq_of(datagram).unwrap_or(0);
                    highest = highest.max(seq);
                    counters.data.fetch_add(1, Ordering::Relaxed);
                    since_ack += 1;
                    if since_ack >= ack_every {
                        since_ack = 0;
                        put_seq(&mut ack, ACK, highest);
                        socket.send_to(&ack, to).context("B acknowledges")?;
                    }
                }
                _ => {}
            }
        }
    }))
}

// --- the measurements ------------------------------------------------------------------------------------

#[derive(Default)]
struct RoundTrips {
    /// Nanoseconds; sorted once every block has run.
    samples: Vec<u64>,
    /// Median of each measured block, nanoseconds.
    block_medians: Vec<u64>,
    timeouts: usize,
    /// Sequence number of the next ping.
    next: u64,
}

impl RoundTrips {
    fn quantile_us(&self, quantile: f64) -> f64 {
        quantile_us(&self.samples, quantile)
    }

    /// Lowest and highest block median, µs.
    fn block_range_us(&self) -> (f64, f64) {
        let min = self.block_medians.iter().min().copied().unwrap_or(0);
        let max = self.block_medians.iter().max().copied().unwrap_or(0);
        (min as f64 / 1000.0, max as f64 / 1000.0)
    }
}

/// The `quantile` of sorted nanosecond samples, in µs (nearest rank).
fn quantile_us(sorted: &[u64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() as f64 * quantile).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

/// Runs `count` ping-pongs on one path, one at a time; records them into `into` unless `warmup`.
fn round_trip_block(
    a: &mut SideA,
    count: usize,
    warmup: bool,
    into: &mut RoundTrips,
    args: &Args,
) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.ping_timeout_ms);
    a.socket.set_read_timeout(Some(timeout))?;
    let mut ping = vec![0u8; args.payload_bytes];
    let mut buffer = vec![0u8; 65536];
    let mut block = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = into.next;
        into.next += 1;
        put_seq(&mut ping, PING, seq);
        let begin = Instant::now();
        a.send(&ping).context("A sends a ping")?;
        let answered = loop {
            match a.recv(&mut buffer) {
                Ok(Some(echo)) if echo.len() == ping.len() && seq_of(echo) == Some(seq) => {
                    break echo[0] == PING;
                }
                Ok(_) if begin.elapsed() < timeout => {}
                Ok(_) => break false,
                Err(error) if timed_out(&error) => break false,
                Err(error) => return Err(error).context("A waits for an echo"),
            }
        };
        let elapsed = begin.elapsed();
        if warmup {
            continue;
        }
        if answered {
            block.push(elapsed.as_nanos() as u64);
        } else {
            into.timeouts += 1;
        }
    }
    if !block.is_empty() {
        block.sort_unstable();
        into.block_medians.push(block[(block.len() - 1) / 2]);
        into.samples.extend_from_slice(&block);
    }
    Ok(())
}

/// Kernel receive-buffer drops during the windowed phase, per socket group.
#[derive(Debug, Default, Clone, Copy)]
struct Drops {
    relay: u64,
    a: u64,
    b: u64,
}

struct Throughput {
    sent: u64,
    received: u64,
    acks_received: u64,
    stalls: u64,
    seconds: f64,
    /// CPU time the relay process used during the sending, if there is one.
    relay_cpu: Option<Duration>,
    drops: Drops,
}

impl Throughput {
    fn goodput_mb_per_s(&self, payload_bytes: usize) -> f64 {
        self.received as f64 * payload_bytes as f64 / self.seconds / 1e6
    }

    fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 * 100.0 / self.sent as f64
    }

    /// Relay CPU per datagram it passed on (data that reached B plus acknowledgements that reached A).
    fn relay_cpu_us_per_datagram(&self) -> Option<f64> {
        let relayed = self.received + self.acks_received;
        self.relay_cpu
            .filter(|_| relayed > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / relayed as f64)
    }
}

/// User + system CPU time of a process (all its threads), from /proc.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15 of the line; counted here after the command name, which is in
    // parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    ensure!(fields.len() > 12, "short stat line");
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// The socket groups whose drops are counted: the relay's ports, A's and B's.
struct DropPorts {
    relay: Vec<u16>,
    a: u16,
    b: u16,
}

impl DropPorts {
    fn read(&self) -> anyhow::Result<Drops> {
        Ok(Drops {
            relay: if self.relay.is_empty() {
                0
            } else {
                udp_drops(&self.relay)?
            },
            a: udp_drops(&[self.a])?,
            b: udp_drops(&[self.b])?,
        })
    }
}

fn throughput(
    a: &mut SideA,
    counters: &Counters,
    relay_pid: Option<u32>,
    ports: &DropPorts,
    args: &Args,
) -> anyhow::Result<Throughput> {
    let ack_timeout = Duration::from_millis(args.ack_timeout_ms);
    a.socket.set_read_timeout(Some(ack_timeout))?;
    let mut data = vec![0u8; args.payload_bytes];
    let mut buffer = vec![0u8; 65536];
    let received_before = counters.data.load(Ordering::Relaxed);
    let drops_before = ports.read()?;
    let cpu_before = relay_pid.map(cpu_time).transpose()?;
    let (mut next, mut acked, mut stalls, mut acks_received) = (0u64, 0u64, 0u64, 0u64);
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs(args.seconds);
    while Instant::now() < deadline {
        while next - acked < args.window {
            put_seq(&mut data, DATA, next);
            a.send(&data).context("A sends data")?;
            next += 1;
        }
        // The window is full: wait for an acknowledgement, or give the window up.
        let waiting = Instant::now();
        loop {
            match a.recv(&mut buffer) {
                Ok(Some(ack)) if ack.len() == 9 && ack[0] == ACK => {
                    acks_received += 1;
                    let highest = seq_of(ack).unwrap_or(0);
                    acked = acked.max(highest + 1);
                    break;
                }
                Ok(_) if waiting.elapsed() < ack_timeout => {}
                Ok(_) => {
                    stalls += 1;
                    acked = next;
                    break;
                }
                Err(error) if timed_out(&error) => {
                    stalls += 1;
                    acked = next;
                    break;
                }
                Err(error) => return Err(error).context("A waits for an acknowledgement"),
            }
        }
    }
    let seconds = begin.elapsed().as_secs_f64();
    // Let what is still on its way arrive: wait until B's count stops moving.
    let mut last = counters.data.load(Ordering::Relaxed);
    let draining = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = counters.data.load(Ordering::Relaxed);
        if now == last || draining.elapsed() > Duration::from_secs(5) {
            break;
        }
        last = now;
    }
    let relay_cpu = match (relay_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_time(pid)?.saturating_sub(before)),
        _ => None,
    };
    let drops_after = ports.read()?;
    Ok(Throughput {
        sent: next,
        received: counters.data.load(Ordering::Relaxed) - received_before,
        acks_received,
        stalls,
        seconds,
        relay_cpu,
        drops: Drops {
            relay: drops_after.relay.saturating_sub(drops_before.relay),
            a: drops_after.a.saturating_sub(drops_before.a),
            b: drops_after.b.saturating_sub(drops_before.b),
        },
    })
}

struct Measured {
    name: &'static str,
    rtt: RoundTrips,
    throughput: Throughput,
}

/// A prepared path: A (already allocated / bound where the path needs it), and B's socket and destination.
struct Prepared {
    name: &'static str,
    a: SideA,
    b: UdpSocket,
    b_to: SocketAddr,
    relay_pid: Option<u32>,
    /// Local UDP ports of the relay's sockets for this path (empty for direct).
    relay_ports: Vec<u16>,
}

/// A path with B running.
struct Running {
    name: &'static str,
    a: SideA,
    relay_pid: Option<u32>,
    ports: DropPorts,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    b_thread: JoinHandle<anyhow::Result<()>>,
}

/// Ping-pongs per block; blocks of the paths take turns, so that a slow spell of the machine (scheduling,
/// another process) falls on every path alike instead of on whichever path runs at that moment.
const BLOCK: usize = 100;

/// Measures every path: round trips in blocks taking turns across the paths, then each path's windowed
/// phase, one path after the other.
fn measure_all(paths: Vec<Prepared>, args: &Args) -> anyhow::Result<Vec<Measured>> {
    let mut running = Vec::new();
    for path in paths {
        let ports = DropPorts {
            relay: path.relay_ports,
            a: path.a.socket.local_addr()?.port(),
            b: path.b.local_addr()?.port(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let b_thread = spawn_b(
            path.b,
            path.b_to,
            args.ack_every,
            stop.clone(),
            counters.clone(),
        )?;
        running.push(Running {
            name: path.name,
            a: path.a,
            relay_pid: path.relay_pid,
            ports,
            stop,
            counters,
            b_thread,
        });
    }
    let result = measure_running(&mut running, args);
    for path in &running {
        path.stop.store(true, Ordering::Relaxed);
    }
    for path in running {
        path.b_thread
            .join()
            .map_err(|_| anyhow::anyhow!("B's thread panicked"))?
            .with_context(|| format!("B of path {}", path.name))?;
    }
    result
}

fn measure_running(running: &mut [Running], args: &Args) -> anyhow::Result<Vec<Measured>> {
    let mut rtts: Vec<RoundTrips> = running.iter().map(|_| RoundTrips::default()).collect();
    for (path, rtt) in running.iter_mut().zip(&mut rtts) {
        round_trip_block(&mut path.a, args.warmup, true, rtt, args)
            .with_context(|| format!("warm-up of path {}", path.name))?;
    }
    eprintln!("round trips, {BLOCK} per block, paths taking turns ...");
    let mut left = args.round_trips;
    while left > 0 {
        let count = left.min(BLOCK);
        for (path, rtt) in running.iter_mut().zip(&mut rtts) {
            round_trip_block(&mut path.a, count, false, rtt, args)
                .with_context(|| format!("round trips on path {}", path.name))?;
        }
        left -= count;
    }
    if args.show_blocks {
        for (path, rtt) in running.iter().zip(&rtts) {
            let medians: Vec<String> = rtt
                .block_medians
                .iter()
                .map(|median| format!("{:.0}", *median as f64 / 1000.0))
                .collect();
            println!("block medians µs, {}: {}", path.name, medians.join(" "));
        }
        println!();
    }
    let mut measured = Vec::new();
    for (path, mut rtt) in running.iter_mut().zip(rtts) {
        rtt.samples.sort_unstable();
        eprintln!("windowed sending over {} ...", path.name);
        let throughput = throughput(
            &mut path.a,
            &path.counters,
            path.relay_pid,
            &path.ports,
            args,
        )
        .with_context(|| format!("windowed sending over path {}", path.name))?;
        measured.push(Measured {
            name: path.name,
            rtt,
            throughput,
        });
    }
    Ok(measured)
}

// --- path 1: direct --------------------------------------------------------------------------------------

fn direct() -> anyhow::Result<Prepared> {
    let (a, b) = (bind_endpoint()?, bind_endpoint()?);
    let (a_addr, b_addr) = (a.local_addr()?, b.local_addr()?);
    Ok(Prepared {
        name: "direct",
        a: SideA {
            socket: a,
            to: b_addr,
            framing: Framing::Plain,
            out: Vec::new(),
        },
        b,
        b_to: a_addr,
        relay_pid: None,
        relay_ports: Vec::new(),
    })
}

// --- path 2: the Vesper super peer's relay ---------------------------------------------------------------

/// A relay token from the node's `Cluster.GrantRelay` (see `vesper_tests::relay`).
async fn grant_relay(cluster: &Cluster) -> anyhow::Result<[u8; 16]> {
    let grant = relay::grant(cluster, 0).await?;
    eprintln!(
        "vesper relay grant: max_bytes {}, max_seconds {}, max_bytes_per_second {}",
        grant.max_bytes, grant.max_seconds, grant.max_bytes_per_second
    );
    relay::token(&grant)
}

/// Binds `socket` to the allocation `token` on `relay`; an error names the relay's refusal.
fn vesper_bind(socket: &UdpSocket, relay: SocketAddr, token: &[u8; 16]) -> anyhow::Result<()> {
    match relay::bind(socket, relay, token)? {
        relay::BOUND => Ok(()),
        status => bail!("relay bind refused: {}", relay::describe(status)),
    }
}

async fn vesper(cluster: &Cluster) -> anyhow::Result<Prepared> {
    let relay = cluster.nodes[0]
        .endpoints()
        .stun
        .context("the super peer serves no UDP relay/STUN port")?;
    let token = grant_relay(cluster).await?;
    let (a, b) = (bind_endpoint()?, bind_endpoint()?);
    vesper_bind(&a, relay, &token).context("bind A")?;
    vesper_bind(&b, relay, &token).context("bind B")?;
    Ok(Prepared {
        name: "vesper relay",
        a: SideA {
            socket: a,
            to: relay,
            framing: Framing::Plain,
            out: Vec::new(),
        },
        b,
        b_to: relay,
        relay_pid: cluster.nodes[0].pid(),
        relay_ports: vec![relay.port()],
    })
}

// --- path 3: coturn --------------------------------------------------------------------------------------

const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING: u16 = 0x0001;
const ALLOCATE: u16 = 0x0003;
const CREATE_PERMISSION: u16 = 0x0008;
const CHANNEL_BIND: u16 = 0x0009;
/// Class bits of a STUN message type: success response, error response.
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
/// Protocol number of UDP, in REQUESTED-TRANSPORT.
const UDP: u8 = 17;
/// The first channel number a client may bind.
const CHANNEL: u16 = 0x4000;

/// A STUN message: header (type, length, magic cookie, transaction id) and attributes padded to 4 bytes.
fn stun_message(kind: u16, transaction: &[u8; 12], attributes: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (attribute, value) in attributes {
        body.extend_from_slice(&attribute.to_be_bytes());
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut message = Vec::with_capacity(20 + body.len());
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&(body.len() as u16).to_be_bytes());
    message.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    message.extend_from_slice(transaction);
    message.extend_from_slice(&body);
    message
}

/// STUN attributes: type and value.
type Attributes = Vec<(u16, Vec<u8>)>;
/// A parsed STUN message: type, transaction id, attributes.
type StunMessage = (u16, [u8; 12], Attributes);

fn parse_stun(datagram: &[u8]) -> Option<StunMessage> {
    if datagram.len() < 20 || datagram[0] & 0xC0 != 0 {
        return None;
    }
    let kind = u16::from_be_bytes([datagram[0], datagram[1]]);
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if datagram[4..8] != MAGIC_COOKIE.to_be_bytes() || datagram.len() < 20 + length {
        return None;
    }
    let transaction: [u8; 12] = datagram[8..20].try_into().ok()?;
    let mut attributes = Vec::new();
    let mut rest = &datagram[20..20 + length];
    while rest.len() >= 4 {
        let attribute = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        attributes.push((attribute, value.to_vec()));
        rest = rest.get((4 + len).next_multiple_of(4)..).unwrap_or(&[]);
    }
    Some((kind, transaction, attributes))
}

/// The XOR-MAPPED-ADDRESS encoding (RFC 5389 section 15.2), which XOR-PEER-ADDRESS and
/// XOR-RELAYED-ADDRESS share: family, port XOR the cookie's high half, address XOR cookie (+ transaction).
fn xor_address(address: SocketAddr, transaction: &[u8; 12]) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = address.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0];
    match address.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(cookie).map(|(byte, key)| byte ^ key));
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let key = cookie.iter().chain(transaction.iter());
            value.extend(ip.octets().iter().zip(key).map(|(byte, key)| byte ^ key));
        }
    }
    value
}

fn parse_xor_address(value: &[u8], transaction: &[u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match value.get(1)? {
        0x01 => {
            let bytes: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
                bytes[i] ^ cookie[i]
            })))
        }
        0x02 => {
            let bytes: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            let key: Vec<u8> = cookie.iter().chain(transaction.iter()).copied().collect();
            IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
                bytes[i] ^ key[i]
            })))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn method_name(method: u16) -> &'static str {
    match method {
        BINDING => "Binding",
        ALLOCATE => "Allocate",
        CREATE_PERMISSION => "CreatePermission",
        CHANNEL_BIND => "ChannelBind",
        _ => "request",
    }
}

/// Sends a STUN/TURN request from `socket` and waits for its response (sent up to `tries` times, 250 ms
/// apart). Returns the success response's attributes and the transaction id; fails on an error response with
/// its code and reason.
fn turn_request(
    socket: &UdpSocket,
    server: SocketAddr,
    method: u16,
    tries: u32,
    attributes: impl Fn(&[u8; 12]) -> Attributes,
) -> anyhow::Result<(Attributes, [u8; 12])> {
    let transaction: [u8; 12] = rand::random();
    let request = stun_message(method, &transaction, &attributes(&transaction));
    let name = method_name(method);
    socket.set_read_timeout(Some(Duration::from_millis(250)))?;
    let mut buffer = [0u8; 2048];
    for _ in 0..tries {
        socket.send_to(&request, server)?;
        let deadline = Instant::now() + Duration::from_millis(250);
        while Instant::now() < deadline {
            let (len, from) = match socket.recv_from(&mut buffer) {
                Ok(received) => received,
                Err(error) if timed_out(&error) => break,
                Err(error) => return Err(error).with_context(|| format!("TURN {name}")),
            };
            let Some((kind, id, answer)) = parse_stun(&buffer[..len]) else {
                continue;
            };
            if from != server || id != transaction {
                continue;
            }
            if kind == method | SUCCESS {
                return Ok((answer, transaction));
            }
            if kind == method | ERROR {
                let reason = answer
                    .iter()
                    .find(|(attribute, _)| *attribute == ATTR_ERROR_CODE)
                    .filter(|(_, value)| value.len() >= 4)
                    .map(|(_, value)| {
                        let code = u16::from(value[2] & 0x07) * 100 + u16::from(value[3]);
                        format!("{code} {}", String::from_utf8_lossy(&value[4..]))
                    })
                    .unwrap_or_else(|| "no ERROR-CODE attribute".into());
                bail!("TURN {name} refused by {server}: {reason}");
            }
            bail!("TURN {name}: unexpected response type {kind:#06x} from {server}");
        }
    }
    bail!("TURN {name}: no response from {server}")
}

struct Coturn {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log file (the cluster's folder, where it lives, is removed when the benchmark ends).
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first of `count` consecutive UDP ports that are free now (for coturn's relay port range).
fn free_udp_range(count: u16) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = free_udp_port()?;
        let Some(last) = first.checked_add(count - 1) else {
            continue;
        };
        let probes: Vec<_> = (first..=last)
            .map(|port| UdpSocket::bind(("127.0.0.1", port)))
            .collect();
        if probes.iter().all(Result::is_ok) {
            return Ok(first);
        }
    }
    bail!("found no {count} consecutive free UDP ports")
}

/// Starts coturn on free ports of 127.0.0.1 (UDP only, no authentication, loopback peers allowed, no
/// configuration file) and waits until it answers a STUN Binding request.
async fn start_coturn(binary: &Path, root: &Path) -> anyhow::Result<Coturn> {
    let port = free_udp_port()?;
    let relay_ports = free_udp_range(16)?;
    let log = root.join("turnserver.log");
    let log_file = std::fs::File::create(&log)?;
    #[rustfmt::skip]
    let arguments: Vec<String> = [
        "-n", "--no-auth",
        "--listening-ip", "127.0.0.1", "--listening-port", &port.to_string(),
        "--relay-ip", "127.0.0.1",
        "--min-port", &relay_ports.to_string(), "--max-port", &(relay_ports + 15).to_string(),
        "--allow-loopback-peers",
        "--no-tcp", "--no-tls", "--no-dtls", "--no-tcp-relay", "--no-cli", "--no-rfc5780",
        "--pidfile", &root.join("turnserver.pid").display().to_string(),
        "--db", &root.join("turndb").display().to_string(),
        "--log-file", "stdout", "--simple-log",
    ]
    .map(String::from)
    .to_vec();
    let child = Command::new(binary)
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {} (apt-get install coturn)", binary.display()))?;
    let mut coturn = Coturn {
        child,
        address: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
    };
    let probe = UdpSocket::bind("127.0.0.1:0")?;
    let (address, log) = (coturn.address, coturn.log.clone());
    let child = &mut coturn.child;
    vesper_tests::wait::until(
        "coturn to answer a STUN Binding request",
        Duration::from_secs(30),
        || {
            let exited = child.try_wait();
            let answered = turn_request(&probe, address, BINDING, 1, |_| Vec::new());
            let log = log.clone();
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("turnserver exited with {status}:\n{}", log_tail(&log));
                }
                Ok(answered.ok())
            }
        },
    )
    .await?;
    Ok(coturn)
}

fn coturn_path(coturn: &Coturn) -> anyhow::Result<Prepared> {
    let (a, b) = (bind_endpoint()?, bind_endpoint()?);
    let b_addr = b.local_addr()?;
    let server = coturn.address;
    let (answer, transaction) = turn_request(&a, server, ALLOCATE, 8, |_| {
        vec![(ATTR_REQUESTED_TRANSPORT, vec![UDP, 0, 0, 0])]
    })?;
    let relayed = answer
        .iter()
        .find(|(attribute, _)| *attribute == ATTR_XOR_RELAYED_ADDRESS)
        .and_then(|(_, value)| parse_xor_address(value, &transaction))
        .context("the Allocate response has no usable XOR-RELAYED-ADDRESS")?;
    turn_request(&a, server, CREATE_PERMISSION, 8, |transaction| {
        vec![(ATTR_XOR_PEER_ADDRESS, xor_address(b_addr, transaction))]
    })?;
    turn_request(&a, server, CHANNEL_BIND, 8, |transaction| {
        vec![
            (
                ATTR_CHANNEL_NUMBER,
                vec![(CHANNEL >> 8) as u8, CHANNEL as u8, 0, 0],
            ),
            (ATTR_XOR_PEER_ADDRESS, xor_address(b_addr, transaction)),
        ]
    })?;
    eprintln!("coturn: A's relayed address {relayed}, channel {CHANNEL:#06x} bound to B {b_addr}");
    Ok(Prepared {
        name: "coturn",
        a: SideA {
            socket: a,
            to: server,
            framing: Framing::Channel(CHANNEL),
            out: Vec::new(),
        },
        b,
        b_to: relayed,
        relay_pid: Some(coturn.child.id()),
        relay_ports: vec![server.port(), relayed.port()],
    })
}

// --- the run ---------------------------------------------------------------------------------------------

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 && value.is_finite() {
        format!("{:.2}x", value / base)
    } else {
        "n/a".into()
    }
}

fn print_report(results: &[Measured], args: &Args) {
    println!(
        "## UDP relay paths ({} B payload; {} round trips after {} warm-up, in blocks of {BLOCK} taking turns; {} s \
         windowed per path, window {}, ack every {})\n",
        args.payload_bytes, args.round_trips, args.warmup, args.seconds, args.window, args.ack_every
    );
    println!(
        "| path | rtt p50 µs | rtt p99 µs | block p50 range µs | ping timeouts | goodput MB/s | datagrams/s | loss % | stalls | relay CPU µs/datagram |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for result in results {
        let t = &result.throughput;
        let cpu = t
            .relay_cpu_us_per_datagram()
            .map_or("-".to_string(), |us| format!("{us:.2}"));
        let (low, high) = result.rtt.block_range_us();
        println!(
            "| {} | {:.1} | {:.1} | {low:.0}-{high:.0} | {} | {:.1} | {:.0} | {:.2} | {} | {cpu} |",
            result.name,
            result.rtt.quantile_us(0.5),
            result.rtt.quantile_us(0.99),
            result.rtt.timeouts,
            t.goodput_mb_per_s(args.payload_bytes),
            t.received as f64 / t.seconds,
            t.loss_percent(),
            t.stalls,
        );
    }
    println!("\nWindowed phase, where datagrams went missing (kernel receive-buffer drops from /proc/net/udp):\n");
    println!("| path | sent | received by B | lost | dropped at relay sockets | dropped at A | dropped at B |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for result in results {
        let t = &result.throughput;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            result.name,
            t.sent,
            t.received,
            t.sent.saturating_sub(t.received),
            t.drops.relay,
            t.drops.a,
            t.drops.b
        );
    }
    let find = |name: &str| results.iter().find(|result| result.name == name);
    let (Some(direct), Some(vesper), Some(coturn)) =
        (find("direct"), find("vesper relay"), find("coturn"))
    else {
        return;
    };
    let p50 = |result: &Measured| result.rtt.quantile_us(0.5);
    let p99 = |result: &Measured| result.rtt.quantile_us(0.99);
    let goodput = |result: &Measured| result.throughput.goodput_mb_per_s(args.payload_bytes);
    println!("\n| ratio | rtt p50 | rtt p99 | goodput |");
    println!("|---|---:|---:|---:|");
    for relayed in [vesper, coturn] {
        println!(
            "| {} / direct | {} | {} | {} |",
            relayed.name,
            ratio(p50(relayed), p50(direct)),
            ratio(p99(relayed), p99(direct)),
            ratio(goodput(relayed), goodput(direct)),
        );
    }
    println!(
        "| vesper / coturn | {} | {} | {} |",
        ratio(p50(vesper), p50(coturn)),
        ratio(p99(vesper), p99(coturn)),
        ratio(goodput(vesper), goodput(coturn)),
    );
    let added_vesper = p50(vesper) - p50(direct);
    let added_coturn = p50(coturn) - p50(direct);
    println!(
        "\np50 round trip added over direct: vesper {added_vesper:.1} µs, coturn {added_coturn:.1} µs; vesper/coturn {}",
        ratio(added_vesper, added_coturn)
    );
    println!(
        "goodput vesper/coturn: {}",
        ratio(goodput(vesper), goodput(coturn))
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    ensure!(
        (16..=65000).contains(&args.payload_bytes),
        "--payload-bytes must be 16..=65000"
    );
    ensure!(
        args.window >= 1 && args.ack_every >= 1,
        "--window and --ack-every must be at least 1"
    );
    eprintln!("starting a 1-node Vesper cluster and coturn ...");
    // The per-allocation relay caps (256 MiB, 8 MiB/s, 600 s by default) are lifted: this measures the
    // path, not the policy.
    let options = NodeOptions {
        extra_args: [
            "--relay-max-bytes",
            "100000000000",
            "--relay-max-bytes-per-second",
            "100000000000",
            "--relay-max-lifetime",
            "1h",
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    };
    let cluster = Cluster::start(1, options).await?;
    let coturn = start_coturn(&args.turnserver, cluster.root()).await?;
    println!(
        "Vesper relay caps lifted for this run: --relay-max-bytes 100000000000 --relay-max-bytes-per-second \
         100000000000 --relay-max-lifetime 1h\n"
    );

    let paths = vec![
        direct()?,
        vesper(&cluster).await?,
        coturn_path(&coturn).with_context(|| {
            format!(
                "set up the coturn path; coturn's log:\n{}",
                log_tail(&coturn.log)
            )
        })?,
    ];
    let measuring = args.clone();
    let results = tokio::task::spawn_blocking(move || measure_all(paths, &measuring)).await??;
    print_report(&results, &args);
    drop(coturn);
    Ok(())
}
