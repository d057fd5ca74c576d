//! `imds-agent uninstall`: detach the kernel filter, remove its pins, (with `--remove-guard`)
//! the early guard, and (with `--restore-taint`) put the startup taint back on the node, so
//! that new pods wait for the next agent.
use anyhow::Context as _;

use crate::{cli::UninstallArgs, guard, kernel, sources, taint};

/// Uninstalls as `args` say; prints what was done.
///
/// # Errors
/// The filter cannot be removed, or the taint cannot be put back.
pub async fn run(args: &UninstallArgs) -> anyhow::Result<()> {
    let done = kernel::uninstall(&args.bpffs)?;
    if done.links.is_empty() && done.maps.is_empty() && done.backstop.is_empty() {
        println!("nothing installed under {}", args.bpffs.display());
    } else {
        println!(
            "detached {} link(s) and removed {} map pin(s) from {}; node backstop removed: {}",
            done.links.len(),
            done.maps.len(),
            args.bpffs.display(),
            if done.backstop.is_empty() { "none found".to_owned() } else { done.backstop.join(", ") }
        );
    }
    if let Some(root) = &args.remove_guard {
        let removed = guard::remove(&guard::InstallPaths { root: root.clone() })?;
        if removed.is_empty() {
            println!("no early guard installed below {}", root.display());
        }
        for file in removed {
            println!("removed {}", file.display());
        }
    }
    if let (Some(key), Some(node)) = (&args.restore_taint, &args.node_name) {
        let client = sources::kube_client(args.kubeconfig.as_deref()).await?;
        let added = taint::restore(client, node, key).await.with_context(|| format!("putting {key} back"))?;
        if added {
            println!("tainted node {node} with {key}:{}: new pods wait for the next agent", taint::EFFECT);
        } else {
            println!("node {node} has the taint {key} already");
        }
    }
    Ok(())
}
