//! The config store on a three-voter group: typed records, uniqueness, precise errors, and
//! the gRPC status each error maps to.

mod common;

use common::Cluster;
use controlplane::config_store::{
    Compression, ContainerSettings, NodeRecord, RecordKind, SettingsProblem,
};
use controlplane::{ConfigError, ConfigStore};

fn settings(rf: u32) -> ContainerSettings {
    ContainerSettings {
        replication_factor: rf,
        erasure_code: None,
        compression: Compression::Inline,
        dedup: false,
    }
}

fn code(e: ConfigError) -> tonic::Code {
    tonic::Status::from(e).code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_records_are_unique_typed_and_fail_precisely() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let config = ConfigStore::new(cluster.node(leader).clone());

    // Nodes.
    let node = |id| NodeRecord {
        node_id: id,
        control_addr: format!("10.0.0.{id}:9000"),
        data_addr: format!("10.0.0.{id}:9001"),
        block: "b1".into(),
        rack: "r1".into(),
    };
    config.add_node(node(1)).await.unwrap();
    config.add_node(node(2)).await.unwrap();
    let dup = config.add_node(node(2)).await.unwrap_err();
    assert!(
        matches!(
            dup,
            ConfigError::AlreadyExists {
                kind: RecordKind::Node,
                ..
            }
        ),
        "{dup}"
    );
    assert_eq!(code(dup), tonic::Code::AlreadyExists);
    assert!(matches!(
        config.add_node(node(0)).await,
        Err(ConfigError::Invalid(SettingsProblem::NodeId))
    ));
    assert_eq!(config.nodes().await.unwrap().len(), 2);
    config.remove_node(2, 0).await.unwrap();
    assert_eq!(
        code(config.remove_node(2, 0).await.unwrap_err()),
        tonic::Code::NotFound
    );

    // Containers.
    let c = config.create_container("gold", settings(3)).await.unwrap();
    assert_eq!(c.record.container_id, 1);
    assert_eq!(
        config
            .create_container("silver", settings(2))
            .await
            .unwrap()
            .record
            .container_id,
        2
    );
    let e = config
        .create_container("gold", settings(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::AlreadyExists {
                kind: RecordKind::Container,
                ..
            }
        ),
        "{e}"
    );
    let e = config
        .create_container("bad/name", settings(2))
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::InvalidArgument);
    let e = config
        .create_container("rf4", settings(4))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::Invalid(SettingsProblem::ReplicationFactor(4))
        ),
        "{e}"
    );
    let mut ec = settings(2);
    ec.erasure_code = Some((8, 1));
    assert_eq!(
        code(config.create_container("ec", ec).await.unwrap_err()),
        tonic::Code::InvalidArgument
    );
    let names: Vec<String> = config
        .containers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.record.name)
        .collect();
    assert_eq!(names, ["gold", "silver"]);

    // Vdisks.
    let v = config.create_vdisk("gold", "db", 1 << 30).await.unwrap();
    assert_eq!(v.record.vdisk_id, 1);
    let e = config
        .create_vdisk("gold", "db", 1 << 30)
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    let e = config
        .create_vdisk("nope", "db", 1 << 30)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::NotFound {
                kind: RecordKind::Container,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        code(config.create_vdisk("gold", "odd", 1000).await.unwrap_err()),
        tonic::Code::InvalidArgument
    );
    config.create_vdisk("silver", "db", 4096).await.unwrap(); // same name, other container
    assert_eq!(config.vdisks("gold").await.unwrap().len(), 1);
    assert_eq!(config.vdisks("").await.unwrap().len(), 2);

    let grown = config
        .resize_vdisk("gold", "db", 2 << 30, v.version)
        .await
        .unwrap();
    assert_eq!(grown.record.size_bytes, 2 << 30);
    let stale = config
        .resize_vdisk("gold", "db", 3 << 30, v.version)
        .await
        .unwrap_err();
    assert!(
        matches!(stale, ConfigError::VersionMismatch { .. }),
        "{stale}"
    );
    assert_eq!(code(stale), tonic::Code::Aborted);
    let shrink = config
        .resize_vdisk("gold", "db", 1 << 30, 0)
        .await
        .unwrap_err();
    assert!(matches!(shrink, ConfigError::Shrink { .. }), "{shrink}");
    assert_eq!(code(shrink), tonic::Code::FailedPrecondition);

    let busy = config.delete_container("gold", 0).await.unwrap_err();
    assert!(
        matches!(busy, ConfigError::ContainerNotEmpty { vdisks: 1, .. }),
        "{busy}"
    );
    assert_eq!(code(busy), tonic::Code::FailedPrecondition);
    config
        .delete_vdisk("gold", "db", grown.version)
        .await
        .unwrap();
    config.delete_container("gold", 0).await.unwrap();
    assert_eq!(
        code(config.delete_container("gold", 0).await.unwrap_err()),
        tonic::Code::NotFound
    );

    // A follower names the leader (UNAVAILABLE, retry there).
    let follower = cluster
        .nodes
        .keys()
        .copied()
        .find(|&id| id != leader)
        .unwrap();
    let e = ConfigStore::new(cluster.node(follower).clone())
        .create_container("x", settings(2))
        .await
        .unwrap_err();
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status
            .metadata()
            .get(controlplane::group::LEADER_METADATA_KEY)
            .unwrap(),
        format!("node-{leader}").as_str()
    );
}
