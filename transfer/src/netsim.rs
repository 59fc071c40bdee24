//! A UDP impairment proxy: loss, delay, jitter (and so reordering),
//! duplication, bit flips and blackouts, for tests and benchmarks.
//!
//! netem is not available on every kernel (it is not on the machines ferry
//! is developed on), and a QUIC seed over a lossy WAN is the case that
//! matters most in the field. The proxy sits between a client and a server:
//! the client sends to [`Proxy::addr`], and each client address gets its own
//! upstream socket, so the server sees one peer per client. Each direction
//! keeps a heap of datagrams ordered by due time; jitter makes later
//! datagrams overtake earlier ones.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// What happens to datagrams, in each direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairments {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// One-way delay (the round trip is twice this).
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`: reorders datagrams.
    pub jitter: Duration,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that one bit of a datagram is flipped.
    pub corrupt: f64,
}

/// Counters of a proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
    pub bytes: AtomicU64,
}

struct Shared {
    imp: Mutex<Impairments>,
    blackout: AtomicBool,
    stats: ProxyStats,
    seed: AtomicU64,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Largest datagram the proxy carries.
const MAX_DATAGRAM: usize = 65_536;

impl Proxy {
    /// Listens on `listen` and forwards to `upstream` with `imp`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        imp: Impairments,
    ) -> std::io::Result<Proxy> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            imp: Mutex::new(imp),
            blackout: AtomicBool::new(false),
            stats: ProxyStats::default(),
            seed: AtomicU64::new(0x5eed),
        });
        let task = tokio::spawn(run_front(front, upstream, Arc::clone(&shared)));
        Ok(Proxy { addr, shared, task })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram in both directions while `on`.
    pub fn set_blackout(&self, on: bool) {
        self.shared.blackout.store(on, Ordering::SeqCst);
    }

    /// Changes the impairments of datagrams that arrive from now on.
    pub fn set_impairments(&self, imp: Impairments) {
        *self.shared.imp.lock() = imp;
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

/// A datagram waiting to go out: due time, arrival order, destination, bytes.
type Pending = (Instant, u64, SocketAddr, Vec<u8>);

/// Datagrams waiting for their due time, earliest first.
struct Delayed {
    heap: BinaryHeap<Reverse<Pending>>,
    n: u64,
}

impl Delayed {
    fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            n: 0,
        }
    }

    fn push(&mut self, due: Instant, to: SocketAddr, data: Vec<u8>) {
        self.n += 1;
        self.heap.push(Reverse((due, self.n, to, data)));
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((d, ..))| *d)
    }

    /// Sends everything that is due.
    async fn flush(&mut self, sock: &UdpSocket) {
        let now = Instant::now();
        while self.next_due().is_some_and(|d| d <= now) {
            if let Some(Reverse((_, _, to, data))) = self.heap.pop() {
                let _ = sock.send_to(&data, to).await;
            }
        }
    }
}

/// Applies the impairments to one datagram; queues zero, one or two copies.
fn impair(
    shared: &Shared,
    rng: &mut rand::rngs::StdRng,
    q: &mut Delayed,
    to: SocketAddr,
    mut data: Vec<u8>,
) {
    let st = &shared.stats;
    if shared.blackout.load(Ordering::Relaxed) {
        st.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let imp = shared.imp.lock().clone();
    if imp.loss > 0.0 && rng.random_bool(imp.loss.min(1.0)) {
        st.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if imp.corrupt > 0.0 && !data.is_empty() && rng.random_bool(imp.corrupt.min(1.0)) {
        let i = rng.random_range(0..data.len());
        data[i] ^= 1 << rng.random_range(0..8);
        st.corrupted.fetch_add(1, Ordering::Relaxed);
    }
    let due = |rng: &mut rand::rngs::StdRng| {
        let jitter = if imp.jitter.is_zero() {
            Duration::ZERO
        } else {
            imp.jitter.mul_f64(rng.random::<f64>())
        };
        Instant::now() + imp.delay + jitter
    };
    st.forwarded.fetch_add(1, Ordering::Relaxed);
    st.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    if imp.duplicate > 0.0 && rng.random_bool(imp.duplicate.min(1.0)) {
        st.duplicated.fetch_add(1, Ordering::Relaxed);
        let d = due(rng);
        q.push(d, to, data.clone());
    }
    let d = due(rng);
    q.push(d, to, data);
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Client → upstream: one upstream socket per client address.
async fn run_front(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(shared.seed.fetch_add(1, Ordering::Relaxed));
    // Queued per client, since each goes out through its own socket.
    let mut queues: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let next = queues.values().filter_map(Delayed::next_due).min();
        tokio::select! {
            r = front.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                #[allow(clippy::map_entry)] // the insert follows an await
                if !backs.contains_key(&client) {
                    let bind: SocketAddr = if upstream.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                        .parse()
                        .unwrap_or(upstream);
                    let Ok(back) = UdpSocket::bind(bind).await else { continue };
                    let back = Arc::new(back);
                    tasks.push(AbortOnDrop(tokio::spawn(run_back(
                        Arc::clone(&back),
                        Arc::clone(&front),
                        client,
                        Arc::clone(&shared),
                    ))));
                    backs.insert(client, back);
                }
                let q = queues.entry(client).or_insert_with(Delayed::new);
                impair(&shared, &mut rng, q, upstream, buf[..n].to_vec());
            }
            _ = sleep_until(next) => {}
        }
        for (client, q) in queues.iter_mut() {
            if let Some(back) = backs.get(client) {
                q.flush(back).await;
            }
        }
    }
}

/// Upstream → one client, through the front socket.
async fn run_back(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(shared.seed.fetch_add(1, Ordering::Relaxed));
    let mut q = Delayed::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = back.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { continue };
                impair(&shared, &mut rng, &mut q, client, buf[..n].to_vec());
            }
            _ = sleep_until(q.next_due()) => {}
        }
        q.flush(&front).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = s.local_addr().expect("addr");
        let t = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, t)
    }

    async fn round_trips(proxy: &Proxy, n: usize) -> (usize, Vec<Vec<u8>>) {
        let c = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        // Receive while sending: a socket's buffer holds only a few hundred
        // small datagrams.
        let rx = {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(Ok((k, _))) =
                    tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf)).await
                {
                    got.push(buf[..k].to_vec());
                }
                got
            })
        };
        for i in 0..n {
            c.send_to(&(i as u32).to_be_bytes(), proxy.addr())
                .await
                .expect("send");
            if i % 32 == 31 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let got = rx.await.expect("receiver");
        (got.len(), got)
    }

    #[tokio::test]
    async fn clean_path_delivers_everything_in_order() {
        let (up, _t) = echo_server().await;
        let p = Proxy::start(
            "127.0.0.1:0".parse().expect("a"),
            up,
            Impairments::default(),
        )
        .await
        .expect("proxy");
        let (n, got) = round_trips(&p, 200).await;
        assert_eq!(n, 200);
        let want: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn loss_duplicates_delay_and_blackout() {
        let (up, _t) = echo_server().await;
        let lossy = Impairments {
            loss: 0.3,
            ..Default::default()
        };
        let p = Proxy::start("127.0.0.1:0".parse().expect("a"), up, lossy)
            .await
            .expect("proxy");
        // Both directions drop 30%: about half the round trips survive.
        let (n, _) = round_trips(&p, 1000).await;
        let st = p.stats();
        assert!(
            (350..650).contains(&n),
            "{n} of 1000 survived; forwarded {} dropped {}",
            st.forwarded.load(Ordering::Relaxed),
            st.dropped.load(Ordering::Relaxed)
        );

        p.set_impairments(Impairments {
            duplicate: 1.0,
            ..Default::default()
        });
        let (n, _) = round_trips(&p, 100).await;
        assert_eq!(n, 400, "duplicated both ways");

        p.set_impairments(Impairments {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            ..Default::default()
        });
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let t = Instant::now();
        c.send_to(b"x", p.addr()).await.expect("send");
        let mut buf = [0u8; 8];
        c.recv_from(&mut buf).await.expect("recv");
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );

        p.set_impairments(Impairments::default());
        p.set_blackout(true);
        let (n, _) = round_trips(&p, 50).await;
        assert_eq!(n, 0);
        p.set_blackout(false);
        let (n, _) = round_trips(&p, 50).await;
        assert_eq!(n, 50);
    }

    #[tokio::test]
    async fn corruption_flips_bits() {
        let (up, _t) = echo_server().await;
        let p = Proxy::start(
            "127.0.0.1:0".parse().expect("a"),
            up,
            Impairments {
                corrupt: 1.0,
                ..Default::default()
            },
        )
        .await
        .expect("proxy");
        let (n, got) = round_trips(&p, 100).await;
        assert_eq!(n, 100);
        let changed = got
            .iter()
            .enumerate()
            .filter(|(i, g)| g.as_slice() != (*i as u32).to_be_bytes())
            .count();
        assert!(changed > 50, "{changed} of 100 changed");
    }
}
