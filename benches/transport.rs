//! Criterion benches of the framed message path without a cluster: two QUIC endpoints on
//! loopback, authenticated by the handshake; one side sends client requests on its link
//! (encode, coalesce, quinn, UDP), the other decodes each and answers on its own link, and
//! the sender matches the answers. Shows what a message costs on the wire path alone, one
//! at a time (latency) and 64 in flight (throughput).
//! Run: `cargo bench -p ringkv-transport --bench transport`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringkv::wire::{Bytes, ClientRequest, ClientResponse, Message, FRAME_BYTES_MAX_DEFAULT};
use ringkv_transport::{
    accept_handshake, connect, endpoint, link_writer, read_streams, server_config, Credentials, LinkSender,
};
use tokio::sync::mpsc;

fn creds(node: Option<&str>) -> Credentials {
    Credentials::secret("bench", b"bench-secret-of-16+".to_vec(), node.map(str::to_string))
}

/// A connected pair: the sender's link and the channel its answers arrive on.
async fn pair() -> (LinkSender, mpsc::UnboundedReceiver<Message>, quinn::Endpoint, quinn::Endpoint) {
    let server = endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), Some(server_config().expect("tls"))).expect("bind");
    let addr = server.local_addr().expect("addr");
    let s = server.clone();
    tokio::spawn(async move {
        let Some(incoming) = s.accept().await else { return };
        let Ok(conn) = incoming.await else { return };
        if accept_handshake(&conn, &creds(Some("server"))).await.is_err() {
            return;
        }
        // Answer every request on the server's own link.
        let link = Arc::new(Mutex::new(link_writer(conn.clone(), FRAME_BYTES_MAX_DEFAULT)));
        read_streams(conn, FRAME_BYTES_MAX_DEFAULT, move |msg| {
            if let (Message::Client { id, .. }, Ok(l)) = (msg, link.lock()) {
                let _ = l.try_send(&Message::ClientReply {
                    id,
                    response: ClientResponse::Written { context: "c".into() },
                    epoch: 0,
                });
            }
            std::future::ready(())
        })
        .await;
    });
    let client = endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None).expect("bind");
    let (conn, _) = connect(&client, addr, &creds(None), None).await.expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(read_streams(conn.clone(), FRAME_BYTES_MAX_DEFAULT, move |msg| {
        let _ = tx.send(msg);
        std::future::ready(())
    }));
    (link_writer(conn, FRAME_BYTES_MAX_DEFAULT), rx, client, server)
}

fn request(id: u64) -> Message {
    Message::Client {
        id,
        request: ClientRequest::Put {
            key: Bytes::from(format!("bench:{id:010}").into_bytes()),
            context: None,
            value: Some(Bytes::from(vec![b'x'; 100])),
            w: None,
            ns: None,
        },
    }
}

fn framed_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (link, mut answers, _client, _server) = rt.block_on(pair());
    let mut g = c.benchmark_group("transport/request_answer_100B");
    let mut id = 0u64;
    for in_flight in [1u64, 64] {
        g.throughput(Throughput::Elements(in_flight));
        g.bench_with_input(BenchmarkId::from_parameter(in_flight), &in_flight, |b, &n| {
            b.iter(|| {
                rt.block_on(async {
                    for _ in 0..n {
                        id += 1;
                        link.send(&request(id)).await.expect("send");
                    }
                    for _ in 0..n {
                        answers.recv().await.expect("answer");
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, framed_path);
criterion_main!(benches);
