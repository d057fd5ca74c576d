//! Writes the CRD YAML generated from `imds_agent::crds` into a directory (default
//! `deploy/crds`). Run through `cargo xtask crdgen`.
use std::{fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(|| PathBuf::from("deploy/crds"), PathBuf::from);
    fs::create_dir_all(&dir)?;
    for (name, yaml) in imds_agent::crds::crd_files() {
        let path = dir.join(name);
        fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
