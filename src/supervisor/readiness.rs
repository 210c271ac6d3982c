//! Readiness checks the supervisor can make without the daemon: a TCP connection accepted on a port, for
//! services that do not answer a CGSE `Ping` (the Service Registry speaks JSON over its own sockets).

use std::time::Duration;

/// One attempt: true when `host:port` accepts a TCP connection within `timeout`. The connection is closed at
/// once; a listener that accepts is taken as ready (the registry binds its sockets when it is ready to serve).
pub async fn tcp_accepts(host: &str, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listening_port_is_ready_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(tcp_accepts("127.0.0.1", port, Duration::from_secs(5)).await);
        // Nothing listens on a reserved port: the connection is refused at once.
        let closed = crate::cgse::testing::ReservedPort::new();
        assert!(!tcp_accepts("127.0.0.1", closed.port(), Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn an_unresolvable_host_is_not_ready() {
        assert!(!tcp_accepts("no-such-host.invalid", 1, Duration::from_secs(5)).await);
    }
}
