//! An embedded single-node control plane ([`ControlPlane::start`]) driven through its public
//! client API: the metadata store over gRPC (routing, CAS conflicts with their details, batches
//! that span shards) and the config watch the data plane subscribes to.

use std::time::{Duration, Instant};

use cairn_proto::v1 as pb;
use controlplane::client::{ClientError, Endpoints, MetadataClient};
use controlplane::server::{ControlPlane, ControlPlaneOptions};
use controlplane::{Expect, GroupOptions, KvOp};

fn put(key: &[u8], expect: Expect) -> KvOp {
    KvOp::Put {
        key: key.to_vec(),
        value: b"value".to_vec(),
        expect,
    }
}

#[test]
fn embedded_control_plane_serves_metadata_and_publishes_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ControlPlaneOptions::new(1, dir.path());
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.group_options = GroupOptions::for_tests;
    let cp = ControlPlane::start(options).unwrap();
    let addr = cp.local_addr().to_string();
    let config = cp.watch_config();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoints = Endpoints::new([addr.as_str()]).unwrap();
        let meta = MetadataClient::new(endpoints.clone());

        let a = b"v/0000000000000001/x/a";
        let b = b"v/0000000000000001/x/b";
        let v1 = meta
            .apply(vec![put(a, Expect::Absent), put(b, Expect::Absent)])
            .await
            .unwrap();
        assert_eq!(meta.get(a).await.unwrap().unwrap().version, v1);
        let scanned = meta.scan(b"v/0000000000000001/").await.unwrap();
        assert_eq!(scanned.len(), 2);
        // A wide scan gathers every shard.
        meta.apply(vec![put(b"v/00000000000000ff/x", Expect::Any)])
            .await
            .unwrap();
        assert_eq!(meta.scan(b"v/").await.unwrap().len(), 3);

        match meta.apply(vec![put(a, Expect::Absent)]).await {
            Err(ClientError::Conflict {
                key,
                expected,
                found,
            }) => {
                assert_eq!(key, a);
                assert_eq!(expected, Expect::Absent);
                assert_eq!(found, Some(v1));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(matches!(
            meta.apply(vec![]).await,
            Err(ClientError::Invalid { .. })
        ));
        // Find two vdisks on different shards: a batch over both is refused.
        let mut spanning = None;
        for v in 2..64u64 {
            let k = format!("v/{v:016x}/x");
            let ops = vec![put(a, Expect::Any), put(k.as_bytes(), Expect::Any)];
            if let Err(ClientError::Invalid { message }) = meta.apply(ops).await {
                spanning = Some(message);
                break;
            }
        }
        assert!(spanning.unwrap().contains("spans shards"));

        // Config changes reach the watch.
        let mut containers =
            pb::container_service_client::ContainerServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        containers
            .create_container(pb::CreateContainerRequest {
                name: "watched".into(),
                settings: None,
            })
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !config
        .borrow()
        .containers
        .iter()
        .any(|c| c.record.name == "watched")
    {
        assert!(
            Instant::now() < deadline,
            "config watch never saw the container"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(config.borrow().version > 0);
    cp.shutdown();
}
