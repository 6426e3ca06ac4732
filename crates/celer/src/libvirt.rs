//! libvirt domain XML for a Celer volume on a vhost-user-blk socket:
//! `celer vhost libvirt-xml` prints it, `celer up` shows the disk element.
//!
//! vhost-user needs the guest's memory shared with the back end
//! (`memoryBacking` with a shared memfd source), and the disk element names
//! the socket; `reconnect` lets QEMU reconnect to a restarted back end (an
//! upgrade of `celer vhost serve` under a running VM). For a live
//! migration the destination host runs its own `celer vhost serve` of the
//! same volume on the same socket path, with the `handoff` option, before
//! `virsh migrate --live`: it takes the volume over at its first I/O, once
//! the source has stopped (docs/operations.md).

use std::path::Path;

/// Escapes text for an XML attribute value in single or double quotes.
fn attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The `<disk>` element of a vhost-user-blk disk on `socket`, `queues`
/// queues, as guest device `target` (e.g. vdb); indented by `indent`.
pub fn disk_xml(socket: &Path, queues: usize, target: &str, indent: &str) -> String {
    let socket = socket.display().to_string();
    [
        "<disk type='vhostuser' device='disk'>".to_string(),
        format!("  <driver name='qemu' type='raw' queues='{queues}'/>"),
        format!("  <source type='unix' path='{}'>", attr(&socket)),
        "    <reconnect enabled='yes' timeout='1'/>".to_string(),
        "  </source>".to_string(),
        format!("  <target dev='{}' bus='virtio'/>", attr(target)),
        "</disk>".to_string(),
    ]
    .iter()
    .map(|l| format!("{indent}{l}\n"))
    .collect()
}

/// The `<memoryBacking>` element vhost-user needs.
pub const MEMORY_BACKING: &str =
    "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>\n";

/// A whole domain (KVM, q35) with the Celer disk, to start from: `name`,
/// `memory_mib` of guest memory, `vcpus`. Boot disk and network are the
/// operator's to add.
pub fn domain_xml(
    name: &str,
    memory_mib: u64,
    vcpus: u32,
    socket: &Path,
    queues: usize,
    target: &str,
) -> String {
    let mut x = String::new();
    x.push_str("<domain type='kvm'>\n");
    x.push_str(&format!("  <name>{}</name>\n", attr(name)));
    x.push_str(&format!("  <memory unit='MiB'>{memory_mib}</memory>\n"));
    x.push_str(&format!("  <vcpu>{vcpus}</vcpu>\n"));
    for l in MEMORY_BACKING.lines() {
        x.push_str(&format!("  {l}\n"));
    }
    x.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n");
    x.push_str("  <devices>\n");
    x.push_str(&disk_xml(socket, queues, target, "    "));
    x.push_str("  </devices>\n");
    x.push_str("</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    #[test]
    fn attribute_values_are_escaped() {
        let d = super::disk_xml(std::path::Path::new("/run/a'b&c.sock"), 2, "vdb", "");
        assert!(d.contains("path='/run/a&apos;b&amp;c.sock'"), "{d}");
    }
}
