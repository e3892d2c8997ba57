//! `TCP_NODELAY` on the Postgres driver's TCP sockets.
//!
//! sqlx (0.9, under sea-orm) connects with a plain `TcpStream::connect` and sets no socket
//! options, so Nagle's algorithm is on for every database connection. A statement whose
//! message spans more than one segment (the sweeper's batches bind 1,000 digests, ~70 KB)
//! then has its tail held back until Postgres acknowledges the first segment, which a
//! delayed ACK postpones by up to 40 ms: the sweep over TCP spent about half its time in such
//! stalls (README, "Where the sweep's time goes"). Postgres sets `TCP_NODELAY` on its side;
//! this sets it on ours.
//!
//! The driver does not expose its socket, so after each new connection the process's own
//! descriptors are matched against the kernel's TCP table (`/proc/self/fd` links name a
//! socket inode, `/proc/self/net/tcp{,6}` gives each inode's remote port) and every socket
//! connected to the database's port gets the option. Setting it twice, or on another
//! connection to the same port, is harmless. Linux only; elsewhere it does nothing.

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to remote `port`.
/// Returns how many sockets were set (0 where `/proc` is unavailable).
pub fn set_on_sockets_to(port: u16) -> usize {
    let inodes = remote_port_inodes(port);
    if inodes.is_empty() {
        return 0;
    }
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut set = 0;
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if socket_inode(&entry.path()).is_some_and(|inode| inodes.contains(&inode))
            && imp::set_nodelay(fd)
        {
            set += 1;
        }
    }
    set
}

/// `TCP_NODELAY` of each TCP socket of this process connected to remote `port`, by socket
/// inode (tests: Postgres' pool here, Redis' connection in `coord`).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn nodelay_of_sockets_to(port: u16) -> Vec<(u64, Option<bool>)> {
    let inodes = remote_port_inodes(port);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        let Some(inode) = socket_inode(&entry.path()) else {
            continue;
        };
        if inodes.contains(&inode) {
            let fd: i32 = entry.file_name().to_str().expect("fd").parse().expect("fd");
            found.push((inode, imp::nodelay(fd)));
        }
    }
    found
}

/// The socket inode a `/proc/self/fd/N` link names (`socket:[12345]`), if it is a socket.
fn socket_inode(fd_link: &std::path::Path) -> Option<u64> {
    let link = std::fs::read_link(fd_link).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Inodes of the established TCP sockets (v4 and v6) whose remote port is `port`.
fn remote_port_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(parse_tcp_table(&text, port));
        }
    }
    inodes
}

/// From one `/proc/net/tcp` table: the inodes of established sockets with remote `port`.
/// Columns: `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …`,
/// addresses as `HEXADDR:HEXPORT`, state `01` = ESTABLISHED.
fn parse_tcp_table(text: &str, port: u16) -> impl Iterator<Item = u64> + '_ {
    text.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let remote_port = fields.get(2)?.rsplit_once(':')?.1;
        let remote_port = u16::from_str_radix(remote_port, 16).ok()?;
        let established = *fields.get(3)? == "01";
        (remote_port == port && established)
            .then(|| fields.get(9)?.parse::<u64>().ok())
            .flatten()
    })
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    /// `setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, 1)`; false when it fails.
    pub fn set_nodelay(fd: i32) -> bool {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local. The fd is
        // one of this process's own sockets; should it have been closed and reused since it
        // was listed, the call fails or sets TCP_NODELAY on another socket of ours, which
        // only changes when that socket sends small segments.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    }

    /// Whether `TCP_NODELAY` is on for `fd` (tests only).
    #[cfg(test)]
    pub fn nodelay(fd: i32) -> Option<bool> {
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local and `len` itself.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::from_mut(&mut on).cast(),
                &mut len,
            ) == 0
        };
        ok.then_some(on != 0)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn set_nodelay(_fd: i32) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_tcp_table() {
        // A listener, a connection to :5432 (0x1538) established and one in TIME_WAIT (06).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D2F0 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D2F2 0100007F:1538 06 00000000:00000000 03:00000C8A 00000000     0        0 0 3 0000000000000000
   3: 0100007F:D2F4 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(parse_tcp_table(table, 5432).collect::<Vec<_>>(), vec![2222]);
        assert_eq!(parse_tcp_table(table, 6379).collect::<Vec<_>>(), vec![3333]);
    }

    #[test]
    fn sets_the_option_on_a_real_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _server = listener.accept().expect("accept");
        assert!(!client.nodelay().expect("nodelay"));
        assert_eq!(set_on_sockets_to(port), 1);
        assert!(client.nodelay().expect("nodelay"));
    }

    /// Every socket of a pool opened on a TCP Postgres URL has the option, from the first
    /// statement on (the hook runs before a new connection is handed out).
    #[tokio::test]
    async fn postgres_pool_connections_get_the_option() {
        let url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let Some(port) = super::super::postgres_tcp_port(&url) else {
            eprintln!("skipped: TEST_DATABASE_URL is not a TCP Postgres URL");
            return;
        };
        let db = match super::super::open(&url, 4, None).await {
            Ok(db) => db,
            Err(e) if std::env::var("ARTIFACTD_REQUIRE_POSTGRES").as_deref() != Ok("1") => {
                eprintln!("skipped: no Postgres at TEST_DATABASE_URL ({e})");
                return;
            }
            Err(e) => panic!("ARTIFACTD_REQUIRE_POSTGRES=1 but no Postgres: {e}"),
        };
        // Four connections at once, so the pool opens more than one.
        let statements = (0..4).map(|_| {
            let db = db.clone();
            async move {
                use sea_orm::ConnectionTrait;
                db.execute_unprepared("SELECT pg_sleep(0.05)").await
            }
        });
        for result in futures::future::join_all(statements).await {
            result.expect("statement");
        }
        let sockets = nodelay_of_sockets_to(port);
        for (inode, nodelay) in &sockets {
            assert_eq!(*nodelay, Some(true), "socket {inode} to port {port}");
        }
        assert!(
            sockets.len() >= 2,
            "only {} sockets to port {port} were open",
            sockets.len()
        );
        db.close().await.expect("close");
    }
}
