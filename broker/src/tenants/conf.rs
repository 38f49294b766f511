//! [`TenantsConf`]: the tenants' NATS `users` entries (bcrypt hashes and permissions), kept
//! in step with the tenant store.

use super::*;

/// A `tenants.conf` file of NATS `users` entries, one marked block per tenant
/// (`# BEGIN tenant <name>` … `# END tenant <name>`), kept in step with create/delete.
///
/// nats-server (2.x) cannot `include` a file inside an array, so this file is not included
/// by `nats.conf`: [`crate::server_config::RuntimeConfig`] inserts its entries at the marker line
/// of the account's `users: [...]` list into a rendered copy the server runs from, and
/// [`crate::server_config::ServerControl::reload`] makes the server take them.
#[derive(Debug, Clone)]
pub struct TenantsConf {
    path: PathBuf,
}

impl TenantsConf {
    /// `<dir>/tenants.conf`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("tenants.conf"),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn begin(tenant: &str) -> String {
        format!("# BEGIN tenant {tenant}")
    }
    fn end(tenant: &str) -> String {
        format!("# END tenant {tenant}")
    }

    fn read(&self) -> std::io::Result<String> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        }
    }

    fn without(text: &str, tenant: &str) -> String {
        let (b, e) = (Self::begin(tenant), Self::end(tenant));
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line == b {
                skipping = true;
            } else if skipping && line == e {
                skipping = false;
            } else if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn write(&self, text: &str) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("conf.tmp");
        std::fs::write(&tmp, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &self.path)
    }

    /// Adds (or replaces) the tenant's entry.
    pub fn upsert(&self, creds: &TenantCredentials) -> std::io::Result<()> {
        let mut text = Self::without(&self.read()?, &creds.tenant);
        text.push_str(&Self::begin(&creds.tenant));
        text.push('\n');
        text.push_str(&creds.nats_user_entry());
        text.push('\n');
        text.push_str(&Self::end(&creds.tenant));
        text.push('\n');
        self.write(&text)
    }

    /// Removes the tenant's entry (no error if absent).
    pub fn remove(&self, tenant: &str) -> std::io::Result<()> {
        let text = self.read()?;
        let new = Self::without(&text, tenant);
        if new != text {
            self.write(&new)?;
        }
        Ok(())
    }
}
