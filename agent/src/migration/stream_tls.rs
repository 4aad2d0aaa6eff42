//! QEMU's own TLS on the migration stream (`tls-creds-x509`, and
//! `tls-authz` on the target), with the node's certificate from the
//! cluster CA: the target's QEMU takes the stream only from the order's
//! source node (its certificate's DN, checked by `authz-simple`), and the
//! source's QEMU sends it only to a peer whose certificate names the
//! target node. Which QMP commands set that up is pure ([`source_commands`],
//! [`target_args`]); [`write_creds_dir`] lays the agent's `[tls]` files
//! out as QEMU reads them.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use vmscale_common::tls::{Identity, TlsFiles};

use crate::qmp::QmpClient;

/// The QOM ids of the objects; ours, so a later move replaces them.
pub const CREDS_ID: &str = "vmscale-migration-tls";
pub const AUTHZ_ID: &str = "vmscale-migration-authz";

/// What one side's QEMU needs for a TLS stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTls {
    /// A directory in QEMU's layout ([`write_creds_dir`]).
    pub dir: PathBuf,
    /// The node at the other end: the target's name for the source's check,
    /// the source's for the target's `tls-authz`.
    pub peer_node: String,
}

/// Why the stream's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamTlsError {
    #[error("cannot lay out the tls files for qemu in {}", dir.display())]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu refused the stream's tls setup ({command})")]
    Qmp {
        command: String,
        #[source]
        source: crate::qmp::Error,
    },
}

/// The distinguished name QEMU's `authz-simple` compares: our certificates
/// (the cluster CA's, see `vmscale_common::testing::TestPki` and the
/// deploy's issuer) have the identity's DNS name as their only subject part.
pub fn node_dn(node: &str) -> String {
    format!("CN={}", Identity::Node(node.to_owned()).dns_name())
}

fn creds(dir: &Path, endpoint: &str) -> Value {
    json!({
        "qom-type": "tls-creds-x509",
        "id": CREDS_ID,
        "dir": dir.display().to_string(),
        "endpoint": endpoint,
        "verify-peer": true,
    })
}

/// The commands that make a source QEMU's next `migrate` use TLS towards
/// `tls.peer_node`, or (`None`) plain text. Objects of an earlier move are
/// deleted first (their deletion may fail: they may not exist).
pub fn source_commands(tls: Option<&StreamTls>) -> Vec<(&'static str, Value, bool)> {
    let mut out = vec![("migrate-set-parameters", json!({"tls-creds": "", "tls-hostname": ""}), true)];
    out.push(("object-del", json!({"id": CREDS_ID}), false));
    if let Some(t) = tls {
        out.push(("object-add", creds(&t.dir, "client"), true));
        let hostname = Identity::Node(t.peer_node.clone()).dns_name();
        out.push(("migrate-set-parameters", json!({"tls-creds": CREDS_ID, "tls-hostname": hostname}), true));
    }
    out
}

/// The options that make an incoming QEMU take the stream over TLS only
/// from `tls.peer_node`: on its command line, so they hold from the moment
/// it listens. `None` if the peer's name is not a plain node name.
pub fn target_args(tls: &StreamTls) -> Option<Vec<String>> {
    if !vmscale_common::tls::node_name_ok(&tls.peer_node) {
        return None;
    }
    // QEMU's option syntax: a comma in a value is written twice.
    let dir = tls.dir.display().to_string().replace(',', ",,");
    let args = [
        "-object".to_owned(),
        format!("tls-creds-x509,id={CREDS_ID},dir={dir},endpoint=server,verify-peer=on"),
        "-object".to_owned(),
        format!("authz-simple,id={AUTHZ_ID},identity={}", node_dn(&tls.peer_node)),
        "-global".to_owned(),
        format!("migration.tls-creds={CREDS_ID}"),
        "-global".to_owned(),
        format!("migration.tls-authz={AUTHZ_ID}"),
    ];
    Some(args.to_vec())
}

/// Runs `commands` (name, arguments, whether a failure counts) on `client`.
pub async fn apply(
    client: &QmpClient,
    commands: Vec<(&'static str, Value, bool)>,
) -> Result<(), StreamTlsError> {
    for (command, args, must) in commands {
        match client.execute::<Value>(command, Some(args)).await {
            Ok(_) => {}
            Err(_) if !must => {}
            Err(source) => return Err(StreamTlsError::Qmp { command: command.to_owned(), source }),
        }
    }
    Ok(())
}

/// Where a node lays its certificate out for QEMU, under its
/// `migration.state_dir` (both its sides of moves use it).
pub fn creds_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("qemu-tls")
}

/// Copies the `[tls]` files into `dir` as QEMU's x509 credentials read
/// them (`ca-cert.pem`, and the node's one certificate and key as both
/// `server-*` and `client-*`), the keys readable by this user only. Run
/// before each move, so a renewed certificate is used from the next on.
pub fn write_creds_dir(files: &TlsFiles, dir: &Path) -> Result<(), StreamTlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StreamTlsError::Files { dir: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    let copies = [
        (&files.ca, "ca-cert.pem"),
        (&files.cert, "server-cert.pem"),
        (&files.cert, "client-cert.pem"),
        (&files.key, "server-key.pem"),
        (&files.key, "client-key.pem"),
    ];
    for (from, name) in copies {
        let bytes = std::fs::read(from).map_err(err)?;
        vmscale_common::durable::write(&dir.join(name), &bytes).map_err(err)?;
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(peer: &str) -> StreamTls {
        StreamTls { dir: "/var/lib/vmscale/migration/qemu-tls".into(), peer_node: peer.into() }
    }

    #[test]
    fn the_source_checks_the_target_node_and_plain_clears_an_earlier_setup() {
        let c = source_commands(Some(&tls("b")));
        let names: Vec<_> = c.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, ["migrate-set-parameters", "object-del", "object-add", "migrate-set-parameters"]);
        assert_eq!(c[2].1["endpoint"], "client");
        assert_eq!(c[2].1["verify-peer"], true);
        assert_eq!(c[3].1, json!({"tls-creds": CREDS_ID, "tls-hostname": "b.node.vmscale"}));
        assert!(!c[1].2, "deleting what may not exist is no failure");
        let plain = source_commands(None);
        assert_eq!(plain[0].1, json!({"tls-creds": "", "tls-hostname": ""}));
        assert!(!plain.iter().any(|(n, _, _)| *n == "object-add"));
    }

    #[test]
    fn the_target_takes_the_stream_from_the_source_node_only() {
        let a = target_args(&tls("a")).unwrap();
        let want = [
            "-object",
            "tls-creds-x509,id=vmscale-migration-tls,dir=/var/lib/vmscale/migration/qemu-tls,endpoint=server,\
             verify-peer=on",
            "-object",
            "authz-simple,id=vmscale-migration-authz,identity=CN=a.node.vmscale",
            "-global",
            "migration.tls-creds=vmscale-migration-tls",
            "-global",
            "migration.tls-authz=vmscale-migration-authz",
        ];
        assert_eq!(a, want);
        assert_eq!(target_args(&tls("a,verify-peer=off")), None);
        assert_eq!(target_args(&tls("")), None);
    }

    #[test]
    fn the_files_are_laid_out_for_qemu_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            ca: src.path().join("ca.pem"),
            cert: src.path().join("n.pem"),
            key: src.path().join("n.key"),
        };
        for (p, body) in [(&files.ca, "CA"), (&files.cert, "CERT"), (&files.key, "KEY")] {
            std::fs::write(p, body).unwrap();
        }
        let dir = src.path().join("qemu-tls");
        write_creds_dir(&files, &dir).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(
            (read("ca-cert.pem"), read("server-cert.pem"), read("client-key.pem")),
            ("CA".into(), "CERT".into(), "KEY".into())
        );
        let mode = std::fs::metadata(dir.join("server-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let missing = TlsFiles { ca: src.path().join("nope.pem"), ..files };
        assert!(matches!(write_creds_dir(&missing, &dir), Err(StreamTlsError::Files { .. })));
    }
}
