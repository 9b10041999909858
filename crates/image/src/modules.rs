//! Kernel module load order from each `.ko`'s `depends=` modinfo field (the Debian package
//! ships no modules.dep).

use std::collections::HashMap;

/// The `depends=` list of a module image.
pub fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(start) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[start + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Orders `wanted` and their dependencies so each module comes after what it depends on.
/// `deps` maps a module name to its `depends=` list; unknown names are an error.
pub fn load_order(
    wanted: &[&str],
    deps: &HashMap<String, Vec<String>>,
) -> Result<Vec<String>, String> {
    fn visit(
        m: &str,
        deps: &HashMap<String, Vec<String>>,
        seen: &mut Vec<String>,
        stack: &mut Vec<String>,
    ) -> Result<(), String> {
        if seen.iter().any(|s| s == m) {
            return Ok(());
        }
        if stack.iter().any(|s| s == m) {
            return Err(format!("module dependency cycle through {m}"));
        }
        let d = deps
            .get(m)
            .ok_or_else(|| format!("module {m} is not in the kernel package"))?;
        stack.push(m.to_string());
        for dep in d {
            visit(dep, deps, seen, stack)?;
        }
        stack.pop();
        seen.push(m.to_string());
        Ok(())
    }
    let mut seen = Vec::new();
    for m in wanted {
        visit(m, deps, &mut seen, &mut Vec::new())?;
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_field() {
        let ko = b"\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(depends(ko), ["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn orders_dependencies_first() {
        let mut deps = HashMap::new();
        let mut add = |m: &str, d: &[&str]| {
            deps.insert(m.to_string(), d.iter().map(|s| s.to_string()).collect());
        };
        add("virtio_ring", &[]);
        add("virtio", &["virtio_ring"]);
        add("virtio_pci_modern_dev", &[]);
        add("virtio_pci_legacy_dev", &[]);
        add(
            "virtio_pci",
            &[
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
            ],
        );
        add("failover", &[]);
        add("net_failover", &["failover"]);
        add("virtio_net", &["virtio_ring", "virtio", "net_failover"]);
        let order = load_order(&["virtio_pci", "virtio_net"], &deps).unwrap();
        let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("failover") < pos("net_failover"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert_eq!(order.len(), 8);
        assert!(load_order(&["nope"], &deps).unwrap_err().contains("nope"));
    }
}
