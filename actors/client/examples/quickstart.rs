//! A program using ringkv-client: write, read, resolve and delete one key.
//! Run against a local cluster (`target/release/ringkv-node dev` prints its config paths):
//!     cargo run -p ringkv-client --example quickstart -- /tmp/ringkv-dev-.../admin.toml

use ringkv_client::{Client, Error};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let config = std::env::args().nth(1).unwrap_or_else(|| "config/cluster/n1.toml".into());
    // A client file ([client]: nodes and certificates) or a node config reaches the cluster.
    let client = Client::from_config_file(&config).await?;
    client.put("cart:alice", b"apple".to_vec(), None).await?; // blind write
    let read = client.get("cart:alice").await?; // every sibling + context
    assert!(read.values.iter().any(|v| v.as_slice() == b"apple"));
    let ctx = read.context.expect("a stored key has a context");
    client.put("cart:alice", b"apple,pear".to_vec(), Some(&ctx)).await?; // supersedes what was read
    let read = client.get("cart:alice").await?;
    assert_eq!(read.values, vec![b"apple,pear".to_vec()]);
    client.delete("cart:alice", None).await?; // reads the context first
    assert!(client.get("cart:alice").await?.values.is_empty());
    println!("quickstart: put, get, resolve and delete went through");
    Ok(())
}
