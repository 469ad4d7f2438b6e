//! The XML the TM scripts send: `<ONE>` around what `onevm show -x` and
//! `onedatastore show -x` print (or a bare `<VM>`, as the migrate actions get
//! it on stdin, or `<DS_DRIVER_ACTION_DATA>`, the monitor action's input).
//! Template values may be CDATA; only the elements named here are read.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// The flat attributes of one template element (`<DISK>`, `<TEMPLATE>`):
/// element name to trimmed text. Vector attributes inside are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs(pub BTreeMap<String, String>);

impl Attrs {
    fn of(node: roxmltree::Node<'_, '_>) -> Attrs {
        let mut m = BTreeMap::new();
        for c in node.children().filter(|c| c.is_element()) {
            if c.children().any(|g| g.is_element()) {
                continue;
            }
            let text: String = c.children().filter_map(|t| t.text()).collect();
            m.insert(c.tag_name().name().to_string(), text.trim().to_string());
        }
        Attrs(m)
    }

    /// A non-empty value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// `YES` (any case) or not.
    pub fn yes(&self, k: &str) -> bool {
        self.get(k).is_some_and(|v| v.eq_ignore_ascii_case("YES"))
    }
}

#[derive(Debug, Clone)]
pub struct History {
    pub seq: u32,
    pub hostname: String,
    pub ds_id: Option<u32>,
    pub tm_mad: String,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub id: u32,
    pub state: u32,
    pub lcm_state: u32,
    pub disks: Vec<Attrs>,
    /// HISTORY_RECORDS in SEQ order.
    pub history: Vec<History>,
}

impl Vm {
    pub fn disk(&self, id: u32) -> Option<&Attrs> {
        let want = id.to_string();
        self.disks
            .iter()
            .find(|d| d.get("DISK_ID") == Some(want.as_str()))
    }

    /// HISTORY[last()]/HOSTNAME: where oned thinks the VM is.
    pub fn last_host(&self) -> Option<&str> {
        self.history.last().map(|h| h.hostname.as_str())
    }

    /// Whether `host` is a hypervisor this VM ever ran on (as opposed to the
    /// front-end, which the "local" epilog variants name).
    pub fn ran_on(&self, host: &str) -> bool {
        self.history.iter().any(|h| h.hostname == host)
    }
}

#[derive(Debug, Clone)]
pub struct Datastore {
    pub id: u32,
    pub name: String,
    pub tm_mad: String,
    pub ds_mad: String,
    pub template: Attrs,
}

#[derive(Debug, Clone, Default)]
pub struct Bundle {
    pub vm: Option<Vm>,
    pub datastores: Vec<Datastore>,
}

impl Bundle {
    pub fn parse(text: &str) -> Result<Bundle> {
        let opts = roxmltree::ParsingOptions {
            allow_dtd: false,
            ..roxmltree::ParsingOptions::default()
        };
        let doc = roxmltree::Document::parse_with_options(text, opts)
            .map_err(|e| Error::Xml(format!("the VM/datastore XML is not well-formed: {e}")))?;
        let root = doc.root_element();
        let tops: Vec<roxmltree::Node<'_, '_>> = match root.tag_name().name() {
            "VM" | "DATASTORE" => vec![root],
            _ => root.children().filter(|c| c.is_element()).collect(),
        };
        let mut b = Bundle::default();
        for n in tops {
            match n.tag_name().name() {
                "VM" if b.vm.is_none() => b.vm = Some(parse_vm(n)?),
                "VM" => return Err(Error::Xml("the XML holds two <VM> elements".into())),
                "DATASTORE" => b.datastores.push(parse_ds(n)?),
                _ => {}
            }
        }
        Ok(b)
    }

    /// The VM, which the action needs.
    pub fn vm(&self) -> Result<&Vm> {
        self.vm
            .as_ref()
            .ok_or_else(|| Error::Xml("no <VM> in the XML on stdin".into()))
    }

    pub fn datastore(&self, id: u32) -> Option<&Datastore> {
        self.datastores.iter().find(|d| d.id == id)
    }
}

fn child<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text(n: roxmltree::Node<'_, '_>, name: &str) -> String {
    child(n, name)
        .map(|c| c.children().filter_map(|t| t.text()).collect::<String>())
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn number(n: roxmltree::Node<'_, '_>, what: &str, name: &str) -> Result<u32> {
    let t = text(n, name);
    t.parse()
        .map_err(|_| Error::Xml(format!("{what}/{name} is '{t}', not a number")))
}

fn parse_vm(n: roxmltree::Node<'_, '_>) -> Result<Vm> {
    let id = number(n, "VM", "ID")?;
    let mut disks = Vec::new();
    if let Some(t) = child(n, "TEMPLATE") {
        for d in t
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "DISK")
        {
            disks.push(Attrs::of(d));
        }
    }
    let mut history = Vec::new();
    if let Some(h) = child(n, "HISTORY_RECORDS") {
        for r in h
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "HISTORY")
        {
            history.push(History {
                seq: number(r, "HISTORY", "SEQ")?,
                hostname: text(r, "HOSTNAME"),
                ds_id: text(r, "DS_ID").parse().ok(),
                tm_mad: text(r, "TM_MAD"),
            });
        }
    }
    history.sort_by_key(|h| h.seq);
    Ok(Vm {
        id,
        state: number(n, "VM", "STATE")?,
        lcm_state: number(n, "VM", "LCM_STATE")?,
        disks,
        history,
    })
}

fn parse_ds(n: roxmltree::Node<'_, '_>) -> Result<Datastore> {
    Ok(Datastore {
        id: number(n, "DATASTORE", "ID")?,
        name: text(n, "NAME"),
        tm_mad: text(n, "TM_MAD"),
        ds_mad: text(n, "DS_MAD"),
        template: child(n, "TEMPLATE").map(Attrs::of).unwrap_or_default(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"<ONE>
<VM><ID>42</ID><STATE>3</STATE><LCM_STATE>3</LCM_STATE>
 <TEMPLATE>
  <DISK><DISK_ID><![CDATA[0]]></DISK_ID><SOURCE><![CDATA[one/one-5]]></SOURCE><CLONE>YES</CLONE>
   <TYPE>BLOCK</TYPE><SIZE>64</SIZE><DATASTORE_ID>101</DATASTORE_ID><TM_MAD>ublk_cache</TM_MAD></DISK>
  <DISK><DISK_ID>1</DISK_ID><SOURCE>one/one-6</SOURCE><CLONE>NO</CLONE><TM_MAD>ceph</TM_MAD></DISK>
  <CONTEXT><DISK_ID>2</DISK_ID></CONTEXT>
 </TEMPLATE>
 <HISTORY_RECORDS>
  <HISTORY><OID>42</OID><SEQ>1</SEQ><HOSTNAME>host2</HOSTNAME><DS_ID>100</DS_ID><TM_MAD>ublk_cache</TM_MAD></HISTORY>
  <HISTORY><OID>42</OID><SEQ>0</SEQ><HOSTNAME>host1</HOSTNAME><DS_ID>100</DS_ID><TM_MAD>ublk_cache</TM_MAD></HISTORY>
 </HISTORY_RECORDS>
</VM>
<DATASTORE><ID>101</ID><NAME>ceph-ublk</NAME><DS_MAD>ceph</DS_MAD><TM_MAD>ublk_cache</TM_MAD>
 <TEMPLATE><CACHE_MODE><![CDATA[BACK]]></CACHE_MODE><BRIDGE_LIST>host1 host2</BRIDGE_LIST></TEMPLATE></DATASTORE>
</ONE>"#;

    #[test]
    fn reads_vm_disks_history_and_datastores() {
        let b = Bundle::parse(SAMPLE).unwrap();
        let vm = b.vm().unwrap();
        assert_eq!((vm.id, vm.state, vm.lcm_state), (42, 3, 3));
        assert_eq!(vm.disks.len(), 2);
        let d0 = vm.disk(0).unwrap();
        assert_eq!(d0.get("SOURCE"), Some("one/one-5"));
        assert!(d0.yes("CLONE"));
        assert!(vm.disk(2).is_none(), "CONTEXT is not a DISK");
        assert_eq!(vm.last_host(), Some("host2"));
        assert!(vm.ran_on("host1") && !vm.ran_on("frontend"));
        let ds = b.datastore(101).unwrap();
        assert_eq!(ds.template.get("CACHE_MODE"), Some("BACK"));
        assert_eq!(ds.tm_mad, "ublk_cache");
    }

    #[test]
    fn a_bare_vm_and_broken_xml() {
        let b =
            Bundle::parse("<VM><ID>1</ID><STATE>8</STATE><LCM_STATE>0</LCM_STATE></VM>").unwrap();
        assert_eq!(b.vm().unwrap().id, 1);
        let e = Bundle::parse("<VM><ID>1</ID>").unwrap_err().to_string();
        assert!(e.contains("not well-formed"), "{e}");
        let e = Bundle::parse("<VM><ID>x</ID></VM>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("VM/ID is 'x'"), "{e}");
        let e = Bundle::parse("<ONE/>")
            .unwrap()
            .vm()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no <VM>"), "{e}");
        assert!(Bundle::parse("<!DOCTYPE x [<!ENTITY a 'b'>]><VM/>").is_err());
    }
}
