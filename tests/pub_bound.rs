//! Issue 13, finding 3: the per-subscriber PUB bound did not hold. zmq.rs cloned the subscriber's
//! `futures` mpsc sender for every message, and every clone owns one slot beyond the channel's buffer, so
//! each message passed the bound of a subscriber that never reads (100 of them with a stream of process
//! events: +33 MB/s, never returned). vendor/zeromq/PATCHES.md, patch 5.
//!
//! Live heap bytes are counted by a global allocator while 20,000 distinct 2 KB messages go to 20
//! subscribers that never read (and one that does, to know when the fan-out is done). With the bound
//! (100 messages each) the heap may grow by a few MB; without it, it kept every message (40+ MB).

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

mod support;
use support::{counting_alloc, zmtp};

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

/// A raw ZMTP 3.0 SUB peer subscribed to everything, which then never reads.
fn silent_subscriber(port: u16) -> TcpStream {
    let mut s = zmtp::connect(port, b"SUB").unwrap();
    // SUBSCRIBE to "" (ZMTP 3.0: a message whose body is 0x01 + topic).
    s.write_all(&[0x00, 0x01, 0x01]).unwrap();
    s
}

/// The runtime of the daemon (two workers).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The tests of this binary measure the one global heap: one at a time.
static HEAP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// vendor/zeromq/PATCHES.md, patch 11: a PUB socket no longer allocates its 100,000-message fan-out queue up
/// front (~4 MB written at creation, the largest part of the daemon's idle memory); the queue grows while
/// messages wait.
#[test]
fn an_idle_pub_socket_holds_no_queue_in_advance() {
    let _one = HEAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = runtime();
    rt.block_on(async {
        let before = counting_alloc::live() as isize;
        let (publisher, _port) = procman::transport::bind_pub("tcp", "127.0.0.1", 0, "test")
            .await
            .unwrap();
        let grown = counting_alloc::live() as isize - before;
        println!("a bound PUB socket: {grown:+} B of heap");
        assert!(grown < 256 * 1024, "a PUB socket with no subscriber holds {grown} B");
        drop(publisher);
    });
    rt.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn a_subscriber_that_never_reads_holds_at_most_its_bound() {
    let _one = HEAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    zeromq::limits::set_pub_subscriber_queue(100);
    let rt = runtime();
    rt.block_on(async {
        let (mut publisher, port) = procman::transport::bind_pub("tcp", "127.0.0.1", 0, "test")
            .await
            .unwrap();
        let silent: Vec<TcpStream> = (0..20).map(|_| silent_subscriber(port)).collect();
        let mut reader = zeromq::SubSocket::new();
        reader.connect(&format!("tcp://127.0.0.1:{port}")).await.unwrap();
        reader.subscribe("").await.unwrap();
        // Wait until every subscription has arrived (the reader sees a probe).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            publisher.send(ZmqMessage::from("probe")).await.unwrap();
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await {
                break;
            }
            assert!(Instant::now() < deadline, "no subscription arrived");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), reader.recv()).await {}
        let before = counting_alloc::live() as isize;
        for i in 0u32..20_000 {
            let mut payload = vec![b'x'; 2048];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            publisher.send(ZmqMessage::from(payload)).await.unwrap();
            if i % 100 == 99 {
                // Let the reader keep up, so that its own queue is not what holds memory.
                while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(20), reader.recv()).await {}
            }
        }
        // The fan-out is done once the reader sees the end marker.
        let deadline = Instant::now() + Duration::from_secs(20);
        'outer: loop {
            publisher.send(ZmqMessage::from("end")).await.unwrap();
            while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), reader.recv()).await {
                if m.get(0).is_some_and(|f| f.as_ref() == b"end") {
                    break 'outer;
                }
            }
            assert!(Instant::now() < deadline, "the reader never saw the end marker");
        }
        let growth = counting_alloc::live() as isize - before;
        println!("live heap growth with 20 silent subscribers after 20,000 x 2 KB messages: {growth} B");
        assert!(growth < 10 << 20, "{growth} bytes held for subscribers that never read");
        drop(silent);
    });
    rt.shutdown_timeout(Duration::from_secs(1));
}
